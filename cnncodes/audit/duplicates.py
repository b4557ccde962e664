"""Duplicates and leaks: exact (the same bytes, or the same decoded pixels) and near (cosine of the codes at or
above a threshold) pairs, within a split and across splits. A val/test image paired with a train image is a
leak: it is listed first, and once per held-out image in `leaks`.

Images + Neighbours (+ the files, when on disk) -> [Pair], strongest first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .config import PIXEL_CHECK
from .images import Images
from .neighbours import Neighbours

EXACT, NEAR = "exact", "near"


@dataclass(frozen=True)
class Pair:
    """Two images, a before b (a leak: a is the held-out image, b the train one), their cosine and kind."""

    a: int
    b: int
    similarity: float
    kind: str
    leak: bool


@dataclass
class Duplicates:
    pairs: list[Pair]
    exact_check: str  # what the exact check read, in words
    notes: list[str] = field(default_factory=list)

    def leaks(self) -> list[Pair]:
        """One pair per held-out image near a train image: its strongest (the pairs are sorted)."""
        seen, out = set(), []
        for p in self.pairs:
            if p.leak and p.a not in seen:
                seen.add(p.a)
                out.append(p)
        return out


def find_duplicates(images: Images, nbrs: Neighbours, near: float) -> Duplicates:
    """Near pairs from the neighbour search, exact ones by the files' bytes and, for pairs of (nearly) identical
    codes, by their decoded pixels; sorted leaks first, then across splits, then within, strongest first."""
    candidates = _near_pairs(nbrs, near)
    kinds = {pair: NEAR for pair in candidates}
    notes = []
    if images.root is None:
        check = "not run: the image files are not known (pass --data); identical images show as near pairs"
    else:
        digests, missing = file_digests(images)
        same_bytes = _equal_groups(digests)
        kinds.update({pair: EXACT for pair in same_bytes})
        pixel_pairs = [p for p in candidates if kinds[p] == NEAR and candidates[p] >= PIXEL_CHECK]
        kinds.update({p: EXACT for p in pixel_pairs if _same_pixels(images, *p)})
        check = (f"bytes (sha256) of {len(images) - missing} files, decoded pixels of {len(pixel_pairs)} pairs "
                 f"with cosine >= {PIXEL_CHECK}")
        if missing:
            notes.append(f"{missing} image files not found under {images.root}: not hashed")
    pairs = [_pair(images, i, j, candidates.get((i, j)), kind) for (i, j), kind in kinds.items()]
    pairs.sort(key=lambda p: (not p.leak, images.splits[p.a] == images.splits[p.b], p.kind != EXACT, -p.similarity,
                              p.a, p.b))
    return Duplicates(pairs, check, notes)


def _near_pairs(nbrs: Neighbours, near: float) -> dict[tuple[int, int], float]:
    """{(i, j), i < j: cosine} of every neighbour pair at or above `near`."""
    rows, cols = np.nonzero(nbrs.similarity >= near)
    j = nbrs.index[rows, cols]
    sims = nbrs.similarity[rows, cols]
    return {(int(min(a, b)), int(max(a, b))): float(s) for a, b, s in zip(rows, j, sims)}


def _pair(images: Images, i: int, j: int, similarity: float | None, kind: str) -> Pair:
    """The pair in its reported order: a held-out image before a train one, else cache order."""
    if similarity is None:  # same bytes but not among each other's neighbours (a group larger than k)
        similarity = float(images.codes[i] @ images.codes[j])
    si, sj = images.splits[i], images.splits[j]
    leak = (si == "train") != (sj == "train")
    if leak and si == "train":
        i, j = j, i
    return Pair(i, j, min(similarity, 1.0), kind, leak)


def file_digests(images: Images) -> tuple[list[str | None], int]:
    """sha256 of each image file (None where the file is missing), and how many were missing."""
    digests, missing = [], 0
    for i in range(len(images)):
        try:
            digests.append(_sha256(images.file(i)))
        except OSError:
            digests.append(None)
            missing += 1
    return digests, missing


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _equal_groups(keys: list[str | None]) -> list[tuple[int, int]]:
    """(first, other) for each image whose key equals an earlier image's: every member paired with the first."""
    first: dict[str, int] = {}
    pairs = []
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    return pairs


def _same_pixels(images: Images, i: int, j: int) -> bool:
    """Whether two files decode to the same RGB pixels (EXIF orientation applied, as extract decodes them)."""
    from ..data import BadImage, load_rgb

    try:
        a, b = load_rgb(images.file(i)), load_rgb(images.file(j))
    except (BadImage, OSError):
        return False
    return a.size == b.size and a.tobytes() == b.tobytes()
