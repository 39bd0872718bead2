"""Sampling prompts as a person types them: the class word added after a bare token, prompt files,
checks, and a folder name per prompt.

(`{token}` / `{class}` templates are filled by `sdlora.prompts.fill_prompt`, and a prompt that names the
token without its class word is completed by `sdlora.prompts.expand_prompt`, which scoring reads too.)
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

from sdlora.errors import ConfigError


def read_prompts_file(path: Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--prompts-file {path}: not UTF-8 text ({exc.reason})") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts, stripped; ConfigError for none at all or an empty one."""
    if not prompts:
        raise ConfigError("no prompts given: pass a prompt such as 'sksToy on a beach', or --prompts-file FILE")
    cleaned = []
    for i, prompt in enumerate(prompts, 1):
        if not prompt or not prompt.strip():
            raise ConfigError(f"prompt {i} is empty: give a prompt such as 'sksToy on a beach'")
        cleaned.append(prompt.strip())
    return list(dict.fromkeys(cleaned))


def slug(prompt: str, max_len: int = 60) -> str:
    """A folder name for a prompt: lower case ASCII words joined by '-' (a hash when it would be empty or long)."""
    base = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if not base or len(base) > max_len:
        digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
        base = f"{base[: max_len - 9].rstrip('-')}-{digest}".strip("-")
    return base


def prompt_dir(prompt: str, taken: dict[str, str]) -> str:
    """The prompt's folder under samples/, disambiguated when another prompt in `taken` (folder ->
    prompt) has the same slug; records the choice in `taken`."""
    name = slug(prompt)
    if taken.get(name, prompt) != prompt:
        name = f"{name[:51]}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"
    taken[name] = prompt
    return name
