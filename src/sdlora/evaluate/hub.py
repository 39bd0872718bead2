"""Hub helpers shared by the scorers: which cached revision was used, and one-line load errors."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import ModelError


def cached_revision(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The commit of the cached snapshot holding one of `filenames` (works offline), else None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # a malformed id: no revision to report
            return None
        if isinstance(found, str):
            # <cache>/models--org--name/snapshots/<commit>/<filename>
            return Path(found).parent.name
    return None


def scorer_error(model: str, exc: BaseException, offline_hint: str) -> ModelError:
    """Turn a hub/loader exception into one line; the common case is 'not cached, offline'."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if any(s in lowered for s in ("local cache", "cached files", "offline", "connect", "connection")):
        return ModelError(
            f"scorer model {model} is not in the local cache and the hub is unreachable "
            f"(download it once with network access, or use {offline_hint} for an offline try)"
        )
    if "not found" in lowered or "404" in lowered or "does not appear to have" in lowered:
        return ModelError(f"scorer model {model} was not found (check the id, or give a local folder)")
    return ModelError(f"scorer model {model} could not be loaded: {text.splitlines()[0]}")


def folder_fingerprint(folder: Path) -> str:
    """A short id of a local model folder's files (names, sizes, mtimes): changes when weights do."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:12]
