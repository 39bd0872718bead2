"""captions.txt: one `<file name>|<caption>` line per image, `#` comments, UTF-8.

This is the training text. Every caption must carry the dataset's token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import DataError
from sdlora.fsutil import write_text

HEADER = "# sdlora captions: <file name>|<caption>, one image per line; every caption carries the token\n"


@dataclass(frozen=True)
class CaptionLine:
    file: str
    caption: str
    line_no: int


def parse_captions(path: str | Path) -> list[CaptionLine]:
    """All caption lines in file order (duplicates kept, so `--check` can report them)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run `sdlora caption` to write template captions)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "|" not in line:
            raise DataError(f"{path}:{no}: expected '<file name>|<caption>', got {line[:60]!r}")
        file, caption = line.split("|", 1)
        lines.append(CaptionLine(file.strip(), caption.strip(), no))
    return lines


def read_captions(path: str | Path) -> dict[str, str]:
    """file name -> caption (the last line wins for a file named twice)."""
    return {line.file: line.caption for line in parse_captions(path)}


def write_captions(path: str | Path, captions: dict[str, str]) -> None:
    """Write captions.txt atomically, sorted by file name."""
    body = "".join(f"{name}|{captions[name]}\n" for name in sorted(captions))
    write_text(path, HEADER + body)
