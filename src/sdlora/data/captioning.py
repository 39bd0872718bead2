"""`sdlora caption`: give every image of a dataset a caption that carries the token.

Missing captions (and template captions, as `prepare` writes them) come from an import
(data/caption_import.py), an image-to-text model passed in as a plain callable
(data/autocaption.py builds one), or else the template; a user's own captions are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from sdlora.data.caption_import import import_captions
from sdlora.data.captions import (
    DEFAULT_TEMPLATE,
    check_class_word,
    clean_caption,
    dataset_images,
    has_token,
    insert_token,
    parse_captions,
    render_template,
    update_captions,
)
from sdlora.data.manifest import CAPTIONS, IMAGES, MANIFEST, load_manifest
from sdlora.errors import DataError
from sdlora.events import ProgressFn
from sdlora.fsutil import remove_stale_tmp, write_json
from sdlora.locks import folder_lock

# An image-to-text model: image paths (+ progress callback) -> one raw caption per image.
Captioner = Callable[[Sequence[Path], Optional[ProgressFn]], list[str]]


@dataclass
class CaptionResult:
    captions_path: Path
    token: str
    class_word: str
    written: dict[str, str] = field(default_factory=dict)  # image -> "template" / "imported" / "auto" / "token added"
    texts: dict[str, str] = field(default_factory=dict)  # image -> the caption written
    kept: list[str] = field(default_factory=list)  # user captions left as they were
    unchanged: list[str] = field(default_factory=list)  # template captions already up to date
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # import lines that gave no caption
    stray: list[str] = field(default_factory=list)  # caption lines for images not in the dataset (left alone)
    class_word_changed_from: str | None = None  # manifest.json's class word before --class-word
    repeated: dict[str, list[int]] = field(default_factory=dict)  # image -> its line numbers, when listed twice


def _set_manifest_class_word(dataset_dir: Path, class_word: str) -> None:
    """Rewrite only `class_word` in manifest.json, so keys this version does not know survive."""
    path = dataset_dir / MANIFEST
    data = json.loads(path.read_text(encoding="utf-8"))
    data["class_word"] = class_word
    write_json(path, data)


def caption_dataset(
    dataset_dir: str | Path,
    *,
    class_word: str | None = None,
    template: str | None = None,
    source: str | Path | None = None,
    captioner: Captioner | None = None,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> CaptionResult:
    """Give every image of the dataset a caption carrying the token; write captions.txt atomically.

    Holds the dataset's lock (sdlora.locks) while it reads and writes, so a second `caption` or a
    `prepare` of the same folder fails at once in one line naming this process.

    Images without a caption (or with a template caption, as `prepare` writes them) get one from
    `source` (an import), `captioner` (a model), or else the template. Captions a user wrote are
    kept (the token is inserted where missing) unless `overwrite`. Everything is read and
    checked before anything is written, so bad input leaves the dataset as it was.
    """
    dataset_dir = Path(dataset_dir)
    load_manifest(dataset_dir)  # a missing or unfinished dataset is refused before the lock creates anything
    with folder_lock(dataset_dir, "caption"):
        remove_stale_tmp(dataset_dir)  # temp files of writes a kill cut short
        return _caption(dataset_dir, class_word, template, source, captioner, overwrite, on_progress)


def _caption(
    dataset_dir: Path,
    class_word: str | None,
    template: str | None,
    source: str | Path | None,
    captioner: Captioner | None,
    overwrite: bool,
    on_progress: ProgressFn | None,
) -> CaptionResult:
    manifest = load_manifest(dataset_dir)
    images = dataset_images(dataset_dir, manifest)
    if not images:
        raise DataError(
            f"{dataset_dir / IMAGES}: no images to caption (run `sdlora prepare PHOTOS --out {dataset_dir}`)"
        )
    token = manifest.token
    word = check_class_word(class_word) if class_word is not None else manifest.class_word
    fill = render_template(template or DEFAULT_TEMPLATE, token, word)
    path = dataset_dir / CAPTIONS
    lines = parse_captions(path) if path.exists() else []
    existing = {line.file: line.caption for line in lines}  # the last line wins, as train reads it
    # Template captions (from `prepare`, or an earlier run with another class word) are not
    # the user's words: replacing them loses nothing.
    placeholders = {
        render_template(DEFAULT_TEMPLATE, token, manifest.class_word).lower(),
        render_template(DEFAULT_TEMPLATE, token, word).lower(),
        fill.lower(),
    }
    result = CaptionResult(path, token, word, stray=sorted(set(existing) - set(images)))
    for line in lines:
        result.repeated.setdefault(line.file, []).append(line.line_no)
    result.repeated = {name: nos for name, nos in result.repeated.items() if len(nos) > 1}
    own = {  # captions the user wrote (not empty, not a template)
        name: existing[name]
        for name in images
        if clean_caption(existing.get(name, "")) and clean_caption(existing[name]).lower() not in placeholders
    }

    def replaceable(name: str) -> bool:
        return overwrite or name not in own

    new: dict[str, tuple[str, str]] = {}
    if source is not None:
        imported = import_captions(source, images, manifest, class_word=word)
        result.unmatched = imported.unmatched
        new.update({name: (text, "imported") for name, text in imported.matched.items() if replaceable(name)})
    if captioner is not None:
        names = [n for n in images if n not in new and replaceable(n)]
        _auto_caption(dataset_dir, names, captioner, token, word, fill, new, on_progress)
    # The template fills what is still missing; with --overwrite and nothing else given, it
    # replaces everything (with --from, images the import does not cover keep their captions).
    template_too = overwrite and source is None and captioner is None
    for name in images:
        if name not in new and (name not in own or template_too):
            new[name] = (fill, "template")
    for name in images:
        if name in own and name not in new:
            if has_token(own[name], token):
                result.kept.append(name)
            else:
                new[name] = (insert_token(own[name], token, word), "token added")

    updates = {}
    for name, (caption, how) in new.items():
        if clean_caption(existing.get(name, "")) == caption:
            result.unchanged.append(name)
        else:
            updates[name] = result.texts[name] = caption
            result.written[name] = how
    if class_word is not None and word != manifest.class_word:
        result.class_word_changed_from = manifest.class_word
    if updates:
        update_captions(path, updates)
    if result.class_word_changed_from is not None:
        _set_manifest_class_word(dataset_dir, word)
    return result


def _auto_caption(
    dataset_dir: Path,
    names: list[str],
    captioner: Captioner,
    token: str,
    class_word: str,
    fill: str,
    new: dict[str, tuple[str, str]],
    on_progress: ProgressFn | None,
) -> None:
    if not names:
        return
    paths = [dataset_dir / IMAGES / name for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: image listed in {MANIFEST} is missing ({len(missing)} missing); re-run `sdlora prepare`"
        )
    raw = captioner(paths, on_progress)
    if len(raw) != len(paths):
        raise RuntimeError(f"captioner returned {len(raw)} captions for {len(paths)} images")
    for name, text in zip(names, raw):
        text = clean_caption(text)
        # A model can return nothing for an odd image; the template is better than a bare token.
        new[name] = (insert_token(text, token, class_word), "auto") if text else (fill, "template")
