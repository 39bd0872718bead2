"""What the scorers record about their weights: the cached hub revision, or a local folder's fingerprint.

(Reachability and one-line load errors are `sdlora.models.hub`, shared with every other loader.)"""

from __future__ import annotations

from pathlib import Path


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


def folder_fingerprint(folder: Path) -> str:
    """A short id of a local model folder's files (names, sizes, mtimes): changes when weights do."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:12]
