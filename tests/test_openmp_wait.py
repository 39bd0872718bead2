"""sdlora (the command and the package: `import sdlora`) makes idle OpenMP threads sleep instead of spin (issue 22).

torch's OpenMP (libgomp) lets a thread that waits at the end of a parallel region spin on its core
first. On a shared CPU that core is what the step's other thread, or another process, is waiting for:
under a load of 8-10 on 2 cores a LoRA UNet step ran 10x slower on 2 spinning threads than on 2
passive ones. The policy is read once, when torch loads OpenMP, so it must be set before that.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, sys; import {module}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def _probe(module: str = "sdlora.cli", **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = PROBE.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("module", ["sdlora.cli", "sdlora.demo"])  # the command, and the Python API
def test_sdlora_sets_a_passive_wait_before_torch_loads(module):
    assert _probe(module) == ["PASSIVE", "False"]


@pytest.mark.parametrize("chosen", ["ACTIVE", "passive"])
def test_a_wait_policy_the_user_chose_is_kept(chosen):
    assert _probe(OMP_WAIT_POLICY=chosen) == [chosen, "False"]
