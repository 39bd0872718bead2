"""captions.txt: one `<file name>|<caption>` line per image, `#` comments, UTF-8.

This is the training text. Every caption must carry the dataset's token. This module reads,
writes and checks the file (`check_captions`, for `sdlora caption --check`) and holds the token
and template rules. Importing a user's captions is data/caption_import.py; filling a dataset's
missing captions (`sdlora caption`) is data/captioning.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora.data.manifest import CAPTIONS, IMAGES, MANIFEST, Manifest, load_manifest
from sdlora.errors import ConfigError, DataError
from sdlora.fsutil import write_text
from sdlora.prompts import DEFAULT_PROMPT, fill_prompt, prompt_fit

HEADER = "# sdlora captions: <file name>|<caption>, one image per line; every caption carries the token\n"
DEFAULT_TEMPLATE = DEFAULT_PROMPT  # the caption `prepare` and `caption` write (sdlora.prompts)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The longest caption read: CLIP reads ~300 characters (77 tokens), T5-style encoders ~2,000 (512); a
# longer one is a pasted file, which would cost minutes and gigabytes to clean and tokenize.
MAX_CAPTION_CHARS = 2000
_FIELD = re.compile(r"\{[^{}]*\}|[{}]")  # a template field (or brace) left after {token}/{class} are filled


# ---------------------------------------------------------------------------- the file format


@dataclass(frozen=True)
class CaptionLine:
    file: str
    caption: str
    line_no: int


@dataclass(frozen=True)
class Malformed:
    """A line that is neither a comment nor a caption line."""

    line_no: int
    text: str
    reason: str


def read_utf8(path: Path, what: str = "") -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what}{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def split_lines(text: str) -> list[str]:
    """The lines of a captions file, split at \\n (and \\r\\n) only, as the format says: str.splitlines
    also splits at U+2028, U+0085 (NEL), \\x1c and other breaks no editor shows as a new line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def too_long(caption: str) -> str:
    """Why `caption` is refused ("" when it is not): longer than MAX_CAPTION_CHARS."""
    if len(caption) <= MAX_CAPTION_CHARS:
        return ""
    return f"the caption is {len(caption):,} characters; at most {MAX_CAPTION_CHARS:,} (the text encoder reads ~300)"


def scan_captions(path: str | Path) -> tuple[list[CaptionLine], list[Malformed]]:
    """Caption lines in file order (duplicates kept) and the malformed lines, for `--check`."""
    path = Path(path)
    try:
        text = read_utf8(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run `sdlora caption` to write template captions)") from None
    lines, bad = [], []
    for no, raw in enumerate(split_lines(text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "|" not in line:
            bad.append(Malformed(no, line[:60], "expected '<file name>|<caption>'"))
            continue
        file, caption = line.split("|", 1)
        if not file.strip():
            bad.append(Malformed(no, line[:60], "no file name before '|'"))
            continue
        if why := too_long(caption):
            bad.append(Malformed(no, line[:60], why))
            continue
        lines.append(CaptionLine(file.strip(), caption.strip(), no))
    return lines, bad


def parse_captions(path: str | Path) -> list[CaptionLine]:
    """All caption lines in file order (duplicates kept, so `--check` can report them)."""
    lines, bad = scan_captions(path)
    if bad:
        raise DataError(f"{path}:{bad[0].line_no}: {bad[0].reason}, got {bad[0].text[:60]!r}")
    return lines


def read_captions(path: str | Path) -> dict[str, str]:
    """file name -> caption (the last line wins for a file named twice)."""
    return {line.file: line.caption for line in parse_captions(path)}


def read_unique_captions(path: str | Path) -> dict[str, str]:
    """file name -> caption, for training: a file captioned on two lines is a DataError naming both (which
    caption did the user mean? `caption --check` lists it as a duplicate)."""
    captions: dict[str, str] = {}
    first: dict[str, int] = {}
    for line in parse_captions(path):
        if line.file in first:
            raise DataError(
                f"{path}:{line.line_no}: {line.file} is captioned again (first on line {first[line.file]}); "
                "keep one of the two lines"
            )
        first[line.file] = line.line_no
        captions[line.file] = line.caption
    return captions


def write_captions(path: str | Path, captions: dict[str, str]) -> None:
    """Write captions.txt atomically, sorted by file name."""
    body = "".join(f"{name}|{captions[name]}\n" for name in sorted(captions))
    write_text(path, HEADER + body)


def update_captions(path: str | Path, updates: dict[str, str]) -> None:
    """Change or add captions, keeping the user's comments, line order and other lines; atomic."""
    path = Path(path)
    if not path.exists():
        write_captions(path, updates)
        return
    out, done = [], set()
    for raw in split_lines(read_utf8(path)):
        line = raw.strip()
        if line and not line.startswith("#") and "|" in line:
            name = line.split("|", 1)[0].strip()
            if name in updates:
                out.append(f"{name}|{updates[name]}")
                done.add(name)
                continue
        out.append(raw)
    if not any(line.strip() for line in out):
        out = [HEADER.rstrip("\n")]
    out += [f"{name}|{updates[name]}" for name in sorted(updates) if name not in done]
    write_text(path, "\n".join(out) + "\n")


# ---------------------------------------------------------------------------- token and template


def _word(text: str) -> re.Pattern[str]:
    """`text` as a whole word (so the class word `car` does not match `cartoon`)."""
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)


def has_token(caption: str, token: str) -> bool:
    # Case-insensitive: the CLIP tokenizers of SD 1.x and SDXL lower-case the prompt anyway.
    return bool(_word(token).search(caption))


def clean_caption(caption: str) -> str:
    """One line, single spaces (a caption may come from a multi-line .txt or a model)."""
    return " ".join(caption.split())


def insert_token(caption: str, token: str, class_word: str) -> str:
    """Put the token before the class word ("a red toy car" -> "a red sksToy toy car"), else in front."""
    caption = clean_caption(caption)
    if has_token(caption, token):
        return caption
    found = _word(class_word).search(caption) if class_word else None
    if found:
        return f"{caption[: found.start()]}{token} {caption[found.start() :]}"
    return f"{token} {caption}".strip()


def render_template(template: str, token: str, class_word: str) -> str:
    """`a photo of {token} {class}` -> `a photo of sksToy toy` (sdlora.prompts.fill_prompt, as train's
    prompts are filled); ConfigError for any other field, a stray brace, or no {token}."""
    text = clean_caption(fill_prompt(template, token, class_word))
    stray = _FIELD.search(text)
    if stray:
        raise ConfigError(
            f"--template {template!r}: bad field {stray.group()!r}; use {{token}} and {{class}}, e.g. {DEFAULT_PROMPT!r}"
        )
    if not has_token(text, token):
        raise ConfigError(f"--template {template!r} has no {{token}}; every caption must carry the token")
    return text


def check_class_word(word: str) -> str:
    word = clean_caption(word)
    if not word or "|" in word or "{" in word or "}" in word:
        raise ConfigError(f"--class-word {word!r}: give a plain word such as 'toy' or 'rc car'")
    return word


# ---------------------------------------------------------------------------- the dataset's images


def dataset_images(dataset_dir: str | Path, manifest: Manifest) -> list[str]:
    """Image names in manifest order (train, val, then any other record), else the images/ folder."""
    names = list(dict.fromkeys([*manifest.train, *manifest.val, *manifest.images]))
    if names:
        return names
    folder = Path(dataset_dir) / IMAGES
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


# ---------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    file: str
    line_no: int | None
    detail: str


PROBLEM_KINDS = (
    "malformed line",
    "duplicate",
    "missing image",
    "empty caption",
    "no token",
    "token cut off",
    "no caption",
)


@dataclass
class CheckResult:
    captions_path: Path
    problems: list[Problem]
    n_captions: int
    n_images: int
    warnings: list[Problem] = field(default_factory=list)  # "too long": over the text encoder's window
    lengths_checked: bool = False  # a tokenizer was given

    @property
    def ok(self) -> bool:
        return not self.problems


def check_captions(dataset_dir: str | Path, tokenizer: Any = None, window: int | None = None) -> CheckResult:
    """Every problem in captions.txt, in a stable order (kind, then line); never writes.

    With a `tokenizer` (the one the base model reads captions through, and its `window`; default: its
    model_max_length), a caption whose token falls past the text encoder's window is a problem ("token cut
    off": train would never see the token), and one that is merely longer than the window is a warning (its
    end is cut; sdlora.prompts.prompt_fit).
    """
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    images = dataset_images(dataset_dir, manifest)
    on_disk = {name for name in images if (dataset_dir / IMAGES / name).is_file()}
    path = dataset_dir / CAPTIONS
    lines, bad = scan_captions(path)
    problems = [Problem("malformed line", "", m.line_no, f"{m.reason}, got {m.text[:60]!r}") for m in bad]
    known = set(images)
    first: dict[str, int] = {}
    warnings: list[Problem] = []
    for line in lines:
        if line.file in first:
            problems.append(Problem("duplicate", line.file, line.line_no, f"also on line {first[line.file]}"))
        else:
            first[line.file] = line.line_no
        if line.file not in known:
            problems.append(Problem("missing image", line.file, line.line_no, f"not an image of {MANIFEST}"))
        elif line.file not in on_disk:
            problems.append(Problem("missing image", line.file, line.line_no, f"{IMAGES}/{line.file} does not exist"))
        if not line.caption:
            problems.append(Problem("empty caption", line.file, line.line_no, "nothing after '|'"))
        elif not has_token(line.caption, manifest.token):
            problems.append(
                Problem("no token", line.file, line.line_no, f"{manifest.token!r} not in {line.caption[:60]!r}")
            )
        elif tokenizer is not None:
            fit = prompt_fit(tokenizer, line.caption, manifest.token, window)
            where = f"{fit.tokens} tokens, the text encoder reads {fit.limit}"
            if fit.token_cut:
                problems.append(
                    Problem("token cut off", line.file, line.line_no, f"{where}: {manifest.token!r} is past them")
                )
            elif fit.over:
                warnings.append(Problem("too long", line.file, line.line_no, f"{where}; the rest is cut off"))
    for name in images:
        if name in on_disk and name not in first:
            problems.append(Problem("no caption", name, None, f"run `sdlora caption {dataset_dir}` to add one"))
    problems.sort(key=lambda p: (PROBLEM_KINDS.index(p.kind), p.line_no or 0, p.file))
    return CheckResult(path, problems, len(lines), len(images), warnings, tokenizer is not None)
