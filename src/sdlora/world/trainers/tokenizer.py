"""The world's CLIPTokenizer: the real CLIP BPE cut down to the merges the world's words use.

Its merges are the subset of CLIP's (in CLIP's order) that tokenizing the world's words applies,
so a world word gets exactly the tokens the real CLIP tokenizer gives it, and any other text
(a LoRA's "sks" token, a typo) falls back to shorter pieces that are all in the vocabulary (every
byte is). About 600 tokens instead of 49,408: the text encoder's embedding table stays small.
The start and end tokens come last, so the end token has the highest id (open_clip and
transformers find the end of a prompt by the argmax of the ids).
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

from sdlora.world import vocab as world_vocab

CONTEXT = 77  # positions, as SD's tokenizers (the training code pads every prompt to 77)
EXTRA_WORDS = ("sks",)  # the DreamBooth token, one token in CLIP's own vocabulary too


def world_words() -> list[str]:
    """Every word a caption, a label or a prompt of the world says."""
    texts = list(world_vocab.COLOURS) + list(world_vocab.CLASSES) + list(world_vocab.PATTERNS.values())
    texts += list(world_vocab.FEATURES.values()) + [b.phrase for b in world_vocab.BACKGROUNDS.values()]
    texts += world_vocab.class_labels() + world_vocab.colour_labels() + world_vocab.background_labels()
    texts += ["a an photo of object something with and ,", *EXTRA_WORDS]
    words = sorted({w for t in texts for w in re.findall(r"[a-z]+|[^\sa-z]", t.lower())})
    return words


def _bpe(word: str, ranks: dict[tuple[str, str], int], used: set[tuple[str, str]]) -> None:
    """CLIP's BPE of one pre-token, recording the merges it applies."""
    from open_clip.tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()
    chars = [enc[b] for b in word.encode("utf-8")]
    parts = chars[:-1] + [chars[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.add(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged


@functools.lru_cache(maxsize=1)
def tokenizer_files() -> tuple[str, str]:
    """(vocab.json, merges.txt) contents of the world's tokenizer."""
    from open_clip.tokenizer import bytes_to_unicode

    from sdlora.models.tiny import _clip_tokenizer_files

    _, merges_path = _clip_tokenizer_files()
    lines = Path(merges_path).read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    ranks = {m: i for i, m in enumerate(merges)}
    used: set[tuple[str, str]] = set()
    for word in world_words():
        _bpe(word, ranks, used)
    kept = sorted(used, key=ranks.__getitem__)
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in kept]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept)
    return json.dumps(ids), merges_txt


def world_tokenizer():
    """A transformers CLIPTokenizer with the world's vocabulary, built offline."""
    from transformers import CLIPTokenizer

    vocab_json, merges_txt = tokenizer_files()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(vocab_json, encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(merges_txt, encoding="utf-8")
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            pad_token="<|endoftext|>",
            model_max_length=CONTEXT,
        )


def vocab_size() -> int:
    return len(json.loads(tokenizer_files()[0]))
