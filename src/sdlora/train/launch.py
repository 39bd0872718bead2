"""Run `python -m sdlora ...` as N data-parallel processes through accelerate's launcher.

`sdlora train --num-processes N` calls `launch_processes(argv, N)`: that is
`accelerate launch --multi_gpu --num_processes N -m sdlora <argv>` (torchrun underneath, one
process per GPU, DDP). On a machine without GPUs, `cpu=True` sets `ACCELERATE_USE_CPU=true`
for the same multi-process launcher, so the processes join a gloo group on the CPU (accelerate's
own `--cpu` flag would run one process only). An accelerate config file (`--accelerate-config`,
checked first by train/fsdp.py) with `distributed_type: FSDP` shards the denoiser (train/fsdp.py),
on GPUs and on a CPU alike.

The workers see `SDLORA_LAUNCHED=1` (`in_launched_process()`), so the CLI can tell that it is
already one of the N processes and must not launch again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from sdlora.errors import ConfigError

LAUNCHED_ENV = "SDLORA_LAUNCHED"
# `accelerate launch` through its public API, in a child Python, with one-line failures.
_LAUNCHER = [sys.executable, "-c", "from sdlora.train.launch import accelerate_launch_main; accelerate_launch_main()"]


def in_launched_process() -> bool:
    """True inside a worker started by `launch_processes` (or by `accelerate launch`/torchrun)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def launch_command(
    argv: Sequence[str],
    num_processes: int,
    *,
    config_file: Path | None = None,
    cpu: bool = False,
    module: str = "sdlora",
    main_process_port: int = 0,
) -> list[str]:
    """The command line that `launch_processes` runs: `accelerate launch` arguments after `_LAUNCHER`."""
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    cmd = [*_LAUNCHER, "--num_processes", str(num_processes)]
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise ConfigError(f"{config_file}: accelerate config file not found (write one with `accelerate config`)")
        # The config decides DDP / FSDP / DeepSpeed and precision; the process count comes from us.
        cmd += ["--config_file", str(config_file)]
    else:
        # Stated explicitly: they win over a default config from `accelerate config`, and accelerate
        # does not warn about values it had to assume.
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd += ["--multi_gpu"]
        elif cpu:
            cmd += ["--cpu"]
    if num_processes > 1:
        # 0 = a free port, so two runs (or two test processes) on one machine do not collide.
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", module, *argv]


def launch_processes(
    argv: list[str],
    num_processes: int,
    *,
    config_file: Path | None = None,
    cpu: bool = False,
    module: str = "sdlora",
    env: Mapping[str, str] | None = None,
    main_process_port: int = 0,
) -> int:
    """Re-run `python -m <module> <argv...>` as `num_processes` processes; returns the exit code.

    `env` adds environment variables for the workers. Ctrl-C reaches the workers directly (same
    process group), so this waits for them to save and exit; SIGTERM is passed on to them.
    """
    cmd = launch_command(
        argv, num_processes, config_file=config_file, cpu=cpu, module=module, main_process_port=main_process_port
    )
    child_env = {**os.environ, **(env or {}), LAUNCHED_ENV: "1"}
    if cpu:
        child_env["ACCELERATE_USE_CPU"] = "true"
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    proc = subprocess.Popen(cmd, env=child_env)
    previous = _forward_sigterm(proc)
    try:
        return _wait(proc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The workers got the same SIGINT and are saving a checkpoint: let them finish.
        try:
            return proc.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            proc.terminate()
            return proc.wait()


def _forward_sigterm(proc: subprocess.Popen):
    def handler(signum, frame):
        proc.send_signal(signal.SIGTERM)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        return None


def accelerate_launch_main(args: Sequence[str] | None = None) -> None:
    """`accelerate launch <args>`, but a failed worker gives one line and its exit code, not a traceback.

    The worker has already printed its own error; torchrun's ChildFailedError report would
    bury it under a launcher traceback.
    """
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parsed = launch_command_parser().parse_args(sys.argv[1:] if args is None else list(args))
    try:
        accelerate_launch(parsed)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        how = f"exit code {failure.exitcode}" if failure.exitcode > 0 else f"signal {-failure.exitcode}"
        print(
            f"sdlora: process {rank} of {parsed.num_processes} failed ({how}); its error is printed above",
            file=sys.stderr,
        )
        sys.exit(code)
    except subprocess.CalledProcessError as exc:  # the single-process launcher
        sys.exit(exc.returncode if exc.returncode > 0 else 128 - exc.returncode)
