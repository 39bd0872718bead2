"""sdlora: photos of one object in, a tested Stable Diffusion LoRA out."""

import os

# Idle OpenMP threads sleep instead of spinning (libgomp spins by default): a spinning thread holds a core
# that its own step's other thread, or another process, is waiting for (docs/performance.md: "train under
# load"). Here, not in the CLI only, so the Python API, the tests and the benchmarks get it too; it must be
# set before torch loads OpenMP, and a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
