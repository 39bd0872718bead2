"""One switch for third-party output, for every verb: sdlora says what matters in its own lines.

The libraries sdlora drives talk on their own: log records (dtype-casting notes, deprecations, and the
26 lines of "Loading ... was unsuccessful" / "size mismatch" that diffusers logs before raising the error
sdlora turns into one line), tqdm bars ("Loading pipeline components", "Loading weights", "Fetching
files") and Python warnings (FutureWarning: `torch_dtype` is deprecated). `quiet_libraries()` turns all
of it off, unless --debug (or SDLORA_DEBUG=1) asks for it.

It runs first, before a verb imports any of them: their own environment variables cover the libraries
imported later, and the processes sdlora starts (accelerate's workers, tune's trials) inherit them;
libraries already imported (sdlora used from Python) are set directly. A user's own -W options win.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# logger name -> the environment variable its library reads its level from on import (None: the logger's own)
LOGGERS: dict[str, str | None] = {
    "diffusers": "DIFFUSERS_VERBOSITY",
    "transformers": "TRANSFORMERS_VERBOSITY",
    "huggingface_hub": "HF_HUB_VERBOSITY",
    "accelerate": "ACCELERATE_LOG_LEVEL",
    "peft": None,
    "open_clip": None,
    "torch": None,
    # torchao's import (peft and diffusers look for it) registers enums torch warns about; torch's own log setup
    # resets "torch" to WARNING when it loads after this, but leaves a child's own level alone.
    "torch.utils._pytree": None,
}
ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's bars (downloads), also inside transformers
    "TQDM_DISABLE": "1",  # tqdm's default for every bar a library opens (diffusers has no switch of its own)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",  # for the child processes; this one filters below
}


def debugging() -> bool:
    return bool(os.environ.get("SDLORA_DEBUG"))


def quiet_libraries() -> None:
    """Silence third-party loggers, progress bars and warnings for this process and its children."""
    if debugging():
        return
    for name, variable in LOGGERS.items():
        if variable is not None:
            os.environ[variable] = "critical"
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.update(ENVIRONMENT)
    if not sys.warnoptions:  # python -W ... : the user asked to see them
        warnings.simplefilter("ignore")
    _already_imported()


def _already_imported() -> None:
    """The switches of libraries imported before this ran (their environment variables were read then)."""
    if "diffusers.utils.logging" in sys.modules:
        sys.modules["diffusers.utils.logging"].disable_progress_bar()
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    if "huggingface_hub.utils" in sys.modules:
        sys.modules["huggingface_hub.utils"].disable_progress_bars()
