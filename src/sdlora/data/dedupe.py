"""Which decoded photos are duplicates of an earlier one (exact or perceptual).

Pure functions over checksums and perceptual hashes, so they are cheap to re-run on cached
values and easy to test without images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sdlora.data.images import hash_distance

# DCT-hash bits that may differ for two photos to count as the same shot (out of 64). Different
# photos of one object from other angles differ by 16+ bits (measured on the DreamBooth
# subjects); a re-saved, resized or slightly re-compressed copy by 0-4.
NEAR_DUPLICATE_BITS = 6


@dataclass(frozen=True)
class Candidate:
    name: str  # source name, also the order: the first of a group is kept
    pixels: str  # checksum of the prepared pixels
    phash: str  # perceptual hash (hex)


@dataclass(frozen=True)
class Duplicate:
    name: str
    of: str  # the kept photo it duplicates
    exact: bool
    distance: int  # perceptual-hash bits that differ (0 for exact)


def find_duplicates(
    candidates: Sequence[Candidate], *, near: bool = True, max_bits: int = NEAR_DUPLICATE_BITS
) -> list[Duplicate]:
    """Duplicates in `candidates` (in the given order, the first of each group is kept).

    Exact: equal pixel checksums. Near (when `near`): perceptual hashes within `max_bits`
    of a photo already kept. Greedy against kept photos only, so a chain of small changes
    (A~B, B~C, A!~C) keeps A and C.
    """
    dups: list[Duplicate] = []
    by_pixels: dict[str, str] = {}
    kept: list[Candidate] = []
    for cand in candidates:
        first = by_pixels.get(cand.pixels)
        if first is not None:
            dups.append(Duplicate(cand.name, first, True, 0))
            continue
        if near:
            best = min(((hash_distance(cand.phash, k.phash), k.name) for k in kept), default=None)
            if best is not None and best[0] <= max_bits:
                dups.append(Duplicate(cand.name, best[1], False, best[0]))
                continue
        by_pixels[cand.pixels] = cand.name
        kept.append(cand)
    return dups
