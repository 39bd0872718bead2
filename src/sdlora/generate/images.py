"""Sample images on disk: PNGs that record what made them, and a labelled grid per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora import __version__
from sdlora.fsutil import atomic_path


def png_metadata(fields: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            info.add_itxt(key, str(value))
    return info


def save_png(image: Any, path: Path, metadata: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_metadata(metadata))


def make_grid(rows: list[tuple[str, list[Any]]], captions: list[str], title: str, min_cell: int = 128) -> Any:
    """A labelled grid: one row per (label, images), a caption under each column, a title on top."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = rows[0][1][0].size
    scale = max(1.0, min_cell / min(width, height))
    cell_w, cell_h = round(width * scale), round(height * scale)
    font = ImageFont.load_default(size=14)
    label_w, title_h, caption_h, pad = 84, 28, 20, 4
    columns = max(len(images) for _, images in rows)
    grid = Image.new(
        "RGB", (label_w + columns * (cell_w + pad), title_h + len(rows) * (cell_h + pad) + caption_h), "white"
    )
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title if len(title) < 110 else title[:107] + "...", fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = title_h + r * (cell_h + pad)
        draw.text((6, y + cell_h // 2 - 8), label, fill="black", font=font)
        for c, image in enumerate(images):
            resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), resample), (label_w + c * (cell_w + pad), y))
    y = title_h + len(rows) * (cell_h + pad)
    for c, caption in enumerate(captions):
        draw.text((label_w + c * (cell_w + pad) + 2, y + 2), caption, fill="dimgray", font=font)
    return grid


def write_grid(out_dir: Path, sub: str, prompt: str, entries: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """`<sub>/grid.png`: the LoRA row above the baseline row, a seed under each column."""
    from PIL import Image

    rows = []
    for variant, label in (("lora", "LoRA"), ("baseline", "base")):
        mine = sorted((e for e in entries if e["variant"] == variant), key=lambda e: e["index"])
        if mine:
            images = []
            for e in mine:
                with Image.open(out_dir / e["file"]) as im:
                    images.append(im.convert("RGB"))
            rows.append((label, images))
    seeds = [e["seed"] for e in sorted((e for e in entries if e["variant"] == "lora"), key=lambda e: e["index"])]
    grid = make_grid(rows, [f"seed {seed}" for seed in seeds], prompt)
    path = out_dir / sub / "grid.png"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=png_metadata({"prompt": prompt, **meta, "sdlora_version": __version__}))
    return path
