"""What every report section shares: reading a file it shows, thumbnails, numbers, the Section record."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

THUMB_PX = 192  # longest side of an embedded sample image


class Unreadable(Exception):
    """A file of the run that exists but cannot be read (shown in its section, never raised out)."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unreadable(f"{path.name}: {exc}") from exc


def thumbnail(path: Path, max_px: int = THUMB_PX) -> str | None:
    """A data URI of the image downscaled to `max_px` (JPEG; PNG for tiny images); None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if max(im.size) <= 96:  # tiny images: PNG is small and stays exact
        im.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        im.save(buf, format="JPEG", quality=82, optimize=True)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt_number(value: Any, digits: int = 3) -> str:
    value = number(value)
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def step_of(folder: Path) -> int | None:
    match = re.fullmatch(r"step-(\d+)", folder.name)
    return int(match.group(1)) if match else None


@dataclass
class Section:
    id: str
    title: str
    body: str = ""
    status: str = "ok"  # ok, missing ("not yet"), error


def not_yet(text: str) -> str:
    return f'<p class="not-yet">Not yet: {escape(text)}</p>'


def figure(uri: str | None, alt: str, caption: str) -> str:
    if uri is None:
        return f'<figure class="thumb missing"><div>unreadable</div><figcaption>{escape(caption)}</figcaption></figure>'
    return (
        f'<figure class="thumb"><img src="{uri}" alt="{escape(alt)}" title="{escape(alt)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )
