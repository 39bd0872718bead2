"""Test helpers for captions: datasets named like `prepare` names them, and a tiny BLIP captioner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import unquote

from conftest import write_tiny_dataset
from sdlora.data.captions import write_captions

# What a phone export looks like: mixed case, HEIC and JPEG, a Yandex Disk URL.
PHONE_SOURCES = [
    "photos/IMG_4651.HEIC",
    "photos/IMG_4652.heic",
    "photos/sub/IMG_4653.JPG",
    "https://disk.yandex.ru/d/AbC123/IMG_4654.HEIC",
    "https://disk.yandex.ru/d/AbC123/%D0%BC%D0%BE%D1%8F%20%D0%B8%D0%B3%D1%80%D1%83%D1%88%D0%BA%D0%B0.HEIC",
    "photos/DSC_0001.jpeg",
]


def write_phone_dataset(folder: Path, sources: list[str] = PHONE_SOURCES) -> dict[str, str]:
    """A tiny dataset whose images are stored under content hashes and come from `sources`.

    Returns source stem -> prepared file name. captions.txt holds `prepare`'s template captions.
    """
    write_tiny_dataset(folder, n=len(sources))
    manifest_path = folder / "manifest.json"
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    renames = {}
    for (old, record), source in zip(sorted(data["images"].items()), sources):
        new = hashlib.sha256(source.encode()).hexdigest()[:16] + ".png"
        (folder / "images" / old).rename(folder / "images" / new)
        renames[old] = new
        record.update(file=new, source=source)
    data["images"] = {renames[old]: rec for old, rec in data["images"].items()}
    data["train"] = [renames[n] for n in data["train"]]
    data["val"] = [renames[n] for n in data["val"]]
    manifest_path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    write_captions(folder / "captions.txt", {new: "a photo of sksToy toy" for new in renames.values()})
    stems = [Path(s.rsplit("/", 1)[-1]).stem for s in sources]
    return {unquote(stem): renames[old] for stem, old in zip(stems, sorted(renames))}


TINY_WORDS = "a an the photo of red blue green toy car on table with small dog sitting".split()


def write_tiny_blip(folder: Path) -> Path:
    """A random-weight BLIP captioner (same classes as Salesforce/blip-image-captioning-base), saved offline.

    Sizes follow transformers' own BLIP tests (hidden 32, 2 layers); the tokenizer is a BERT
    WordPiece tokenizer over a 22-entry vocabulary written here, so nothing is downloaded.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *TINY_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), bos_token="[DEC]")
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=vocab.index("[DEC]"),
        sep_token_id=vocab.index("[SEP]"),
        eos_token_id=vocab.index("[SEP]"),
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    return folder
