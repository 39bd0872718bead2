"""The Hugging Face Hub, for every loader: is it reachable, and what a failed load means in one line.

`hub_offline()` answers once per process whether downloads are off: HF_HUB_OFFLINE=1 set by the
user, or the hub endpoint (`huggingface_hub.constants.ENDPOINT`, i.e. $HF_ENDPOINT) gave no HTTP
answer within `PROBE_TIMEOUT_S`. In the second case it switches huggingface_hub (and transformers,
diffusers, open_clip, which ask it) to offline mode, so a cached model still loads and an uncached
one fails at once, instead of after minutes of "Retrying in 8s".

`hub_error(label, exc, fix)` turns what a hub-backed loader raised (huggingface_hub's own error
types, also when transformers / diffusers / open_clip wrap them) into one-line `ModelError`s.
Every loader calls both: the base model and VAE (models/loading.py), the DINO and CLIP scorers
(evaluate/), and the auto-captioner (data/autocaption.py).
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request

from sdlora.errors import ModelError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "true", "yes"}
_probed: dict[str, bool] = {}  # endpoint -> reachable, one probe per process and endpoint
_went_offline = False  # this process switched the hub to offline mode (HF_HUB_OFFLINE was unset)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` (the hub endpoint) answers HTTP at all within `timeout` seconds; cached per process.

    Any HTTP status counts as an answer. No route, a refused connection, a DNS failure, or a server
    that accepts and never answers all count as unreachable. The probe runs in a daemon thread so a
    hanging name lookup cannot hold the caller past `timeout`.
    """
    url = url or endpoint()
    if url not in _probed:
        answer: list[bool] = []

        def probe() -> None:
            request = urllib.request.Request(url, method="HEAD")
            try:
                with urllib.request.urlopen(request, timeout=timeout):
                    pass
                answer.append(True)
            except urllib.error.HTTPError:  # 4xx / 5xx: the hub is there
                answer.append(True)
            except (OSError, ValueError):  # URLError, timeouts, refused, bad URL
                answer.append(False)

        thread = threading.Thread(target=probe, name="sdlora-hub-probe", daemon=True)
        thread.start()
        thread.join(timeout)
        _probed[url] = bool(answer and answer[0])
    return _probed[url]


def offline_by_user() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set in the environment by the user, not by this module."""
    from huggingface_hub import constants

    if _went_offline:
        return False
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.strip().lower() in _TRUE for flag in flags)


def hub_offline() -> bool:
    """True when downloads are off: set by the user, or the hub is unreachable (then offline mode is
    switched on here, for this process). Call it before loading anything from the hub."""
    global _went_offline
    from huggingface_hub import constants

    if _went_offline:
        return True
    if offline_by_user():
        constants.HF_HUB_OFFLINE = True  # also when the variable was set after huggingface_hub was imported
        return True
    if hub_reachable():
        return False
    # huggingface_hub reads this module attribute on every request (constants.is_offline_mode());
    # the environment variable is for libraries and subprocesses that read HF_HUB_OFFLINE themselves.
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    _went_offline = True
    return True


def why_offline() -> str:
    """Why downloads are off, for an error message."""
    if _went_offline:
        return f"the hub is unreachable (no answer from {endpoint()} within {PROBE_TIMEOUT_S:g} s)"
    return "downloads are off (HF_HUB_OFFLINE=1)"


def _chain(exc: BaseException):
    """`exc` and what it was raised from: transformers, diffusers and open_clip wrap hub errors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def hub_error(label: str, exc: BaseException, fix: str) -> ModelError:
    """One line for a failed hub-backed load, chosen by the exception's type (or a type it wraps).

    `label` names the model ("model nobody/x", "scorer model ViT-B-32 (openai)"); `fix` is what to
    do when it is not cached ("or use --model tiny-sd for an offline try").
    """
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(_chain(exc))

    def find(*types: type) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    if find(LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError):
        why = why_offline() if (_went_offline or offline_by_user()) else "the hub is unreachable"
        return ModelError(f"{label}: not in the local cache and {why}; download it once with network access, {fix}")
    if find(GatedRepoError):  # before RepositoryNotFoundError: a gated repo is one of those
        return ModelError(f"{label}: gated on the hub; accept its licence there and log in (hf auth login)")
    if find(RepositoryNotFoundError):
        return ModelError(f"{label}: not found on the hub (check the id, or give a local folder)")
    if err := find(RevisionNotFoundError):
        return ModelError(f"{label}: no such revision on the hub ({_first_line(err)})")
    if err := find(EntryNotFoundError):
        return ModelError(f"{label}: a file it needs is missing on the hub ({_first_line(err)})")
    if err := find(HfHubHTTPError):
        return ModelError(f"{label}: the hub refused the download ({_first_line(err)})")
    return ModelError(f"{label}: could not be loaded ({_first_line(exc)})")
