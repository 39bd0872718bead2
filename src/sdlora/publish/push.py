"""`sdlora push`: stage what a user shares in runs/<name>/hub/, then upload it as one Hub commit.

The staged folder holds, at the repo's root, the LoRA for each loader (`pytorch_lora_weights.safetensors`
for diffusers, the kohya-layout `<run>.safetensors` for ComfyUI / AUTOMATIC1111), the token's
`embeddings.safetensors` when the run trained one, the sample images the card shows (at their
`samples/...` paths) and the card as README.md. It is built in a temp folder beside it and renamed
into place, so hub/ is always whole; LoRA files are hard links where the file system allows (no copy).
The run folder's own README.md (the same card, loading from the run folder) is refreshed too.

The upload goes through huggingface_hub with the user's saved token (`hf auth login`, or HF_TOKEN):
`whoami` (is the token valid), `create_repo(exist_ok=True)`, then one `create_commit` with every file:
a commit is atomic on the Hub, so a failed push leaves the repo as it was. (`upload_folder` is not
used: with hf_xet installed it may split a folder into several commits.) Only after the commit
succeeds is runs/<name>/push.json written: the repo, the commit and each file's sha256.

Without a token or a network the folder and the card are still written, and the one-line PushError
says what is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import sdlora
from sdlora.errors import ConfigError, PushError
from sdlora.fsutil import sha256_file, write_json, write_text
from sdlora.locks import folder_lock
from sdlora.publish.card import CARD, build_card, lora_files, shown_samples, write_run_card
from sdlora.run import RunInfo, load_run

HUB_DIR = "hub"  # runs/<name>/hub/: exactly what the last push uploaded (or would upload)
PUSH_JSON = "push.json"  # runs/<name>/push.json: the last successful push
LOGIN_HINT = "run `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"


@dataclass
class Staged:
    folder: Path
    files: list[str]  # paths inside the folder (and the repo), README.md last

    def summary(self) -> str:
        images = sum(1 for f in self.files if f.endswith(".png"))
        return f"{len(self.files) - images - 1} model file(s), {images} image(s) and {CARD}"

    def not_pushed(self) -> str:
        """The start of every failed push's line: the work is on disk, the Hub has none of it."""
        return f"{self.folder}: staged ({self.summary()}), not pushed: "


@dataclass
class PushResult:
    staged: Staged
    card: Path  # the run folder's README.md
    repo_id: str
    url: str | None = None  # None: a dry run, nothing uploaded
    commit: str | None = None
    commit_url: str | None = None
    record: Path | None = None


def check_repo_id(repo_id: str) -> str:
    """`--repo` as USER/NAME (an organisation works as USER); ConfigError naming the flag otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = (repo_id or "").strip()
    if repo_id.count("/") != 1:
        raise ConfigError(f"--repo {repo_id!r}: give USER/NAME (your Hub user or organisation, a slash, a repo name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"--repo {repo_id!r}: not a valid Hub repo id ({str(exc).splitlines()[0]})") from None
    return repo_id


# ---- staging ----------------------------------------------------------------------------------------


def _place(src: Path, dest: Path) -> None:
    """A hard link to `src` (sdlora replaces its files by rename, so the link keeps this version), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def stage_hub_folder(run: RunInfo, repo_id: str) -> Staged:
    """Write runs/<name>/hub/ whole (built beside it, then renamed into place) and return what it holds."""
    files = lora_files(run)
    shown = shown_samples(run)
    card = build_card(run, repo_id)
    for stale in run.path.glob(".hub-*.tmp"):  # left by a killed push (we hold the run folder's lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=run.path, prefix=".hub-", suffix=".tmp"))
    try:
        names = [p.name for p in files.shared()]
        for path in files.shared():
            _place(path, tmp / path.name)
        images = list(dict.fromkeys(rel for s in shown for rel in (s.lora, s.baseline) if rel))
        for rel in images:
            _place(run.path / rel, tmp / rel)
        write_text(tmp / CARD, str(card))
        final = run.path / HUB_DIR
        old = run.path / f".hub-old-{uuid.uuid4().hex[:8]}.tmp"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Staged(final, [*names, *images, CARD])


# ---- upload ----------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "\u2026"


def _network_error(exc: BaseException) -> bool:
    """A failure to reach the Hub: a refused or dropped connection, DNS, a timeout. huggingface_hub raises
    its HTTP client's types (requests in 0.x, httpx in 1.x, httpx2 in 2.x), so they are told by name."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return False  # a local file that could not be read: not the network's fault
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "TimeoutException", "RequestException", "ConnectionError", "Timeout"}
    )


@contextlib.contextmanager
def _hub_errors(staged: Staged, endpoint: str, repo_id: str) -> Iterator[None]:
    """What huggingface_hub raised as one PushError line: what is missing, and that nothing was pushed."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    host = urlparse(endpoint).netloc or endpoint
    prefix = staged.not_pushed()
    try:
        yield
    except LocalTokenNotFoundError:  # whoami found none
        raise PushError(prefix + f"no Hugging Face token; {LOGIN_HINT}") from None
    except OfflineModeIsEnabled:
        raise PushError(prefix + "HF_HUB_OFFLINE=1 is set; unset it to push") from None
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            why = f"{host} rejected the token (401: {_first_line(exc)}); {LOGIN_HINT} with a valid token"
        elif status == 403:
            why = f"{host} refused (403): the token may not write to {repo_id} (use a write token, or your own USER/)"
        else:
            why = f"{host} answered {status}: {_first_line(exc)}"
        raise PushError(prefix + why) from None
    except ValueError as exc:  # create_commit's card check (validate-yaml) raises one, its reasons on later lines
        text = " ".join(str(exc).split())
        raise PushError(prefix + f"{host} refused the upload: {text[:300]}") from None
    except Exception as exc:
        if not _network_error(exc):
            raise
        raise PushError(prefix + f"cannot reach {host} ({type(exc).__name__}: {_first_line(exc)})") from None


def upload(staged: Staged, repo_id: str, *, private: bool, token: str, commit_message: str) -> object:
    """Create the repo if needed (`private` only then) and commit every staged file at once; the CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with _hub_errors(staged, api.endpoint, repo_id):
        api.whoami()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(staged.folder / rel)) for rel in staged.files
        ]
        return api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")


def push_run(
    run: RunInfo | Path | str, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None
) -> PushResult:
    """Stage the run in hub/ (and refresh its README.md), then push it to `repo_id` unless `dry_run`.

    PushError (after staging) when there is no token, no network, or the Hub refuses; push.json is
    written only after the commit succeeded.
    """
    from huggingface_hub import constants, get_token

    repo_id = check_repo_id(repo_id)
    run = run if isinstance(run, RunInfo) else load_run(run)
    with folder_lock(run.path, "push"):
        card = write_run_card(run)
        staged = stage_hub_folder(run, repo_id)
        result = PushResult(staged, card, repo_id)
        if dry_run:
            return result
        token = token or get_token()
        prefix = staged.not_pushed()
        if token is None:
            raise PushError(prefix + f"no Hugging Face token; {LOGIN_HINT}")
        if constants.HF_HUB_OFFLINE:
            raise PushError(prefix + "HF_HUB_OFFLINE=1 is set; unset it to push")
        steps = lora_files(run).metadata.get("sdlora.steps")
        message = f"sdlora push: run {run.name}" + (f", step {steps}" if steps else "")
        info = upload(staged, repo_id, private=private, token=token, commit_message=message)
        result.url = f"{constants.ENDPOINT}/{repo_id}"
        result.commit, result.commit_url = info.oid, info.commit_url
        result.record = run.path / PUSH_JSON
        write_json(
            result.record,
            {
                "repo_id": repo_id,
                "url": result.url,
                "commit": info.oid,
                "commit_url": info.commit_url,
                "pushed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "private_requested": private,
                "sdlora_version": sdlora.__version__,
                "files": {
                    rel: {"sha256": sha256_file(staged.folder / rel), "size": (staged.folder / rel).stat().st_size}
                    for rel in staged.files
                },
            },
        )
        return result
