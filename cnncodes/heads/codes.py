"""Reading the train codes: blocks streamed from the cache, standardiser statistics, the in-memory
train set, image ids per row, and the memory budget of the in-memory solvers.

cache -> `load_train` -> `TrainSet` (codes standardised in memory, or the h5 dataset streamed by
`iter_blocks`) -> the solvers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import CnnCodesError
from .names import HOLDOUT_ABOVE, LBFGS_MEMORY, TORCH_CLFS

PIECE_ROWS = 64  # rows per read; pieces are the unit of shuffling across the cache
BLOCK_BYTES = 8 << 20  # codes held in memory at once while streaming (peak ~3 blocks)
IN_MEMORY_BYTES = 512 << 20  # torch heads load a train split smaller than this
CODE_BYTES = 4  # bytes per code value that the in-memory heads hold (float32)


def iter_blocks(features, rng: np.random.Generator | None = None, mean: np.ndarray | None = None,
                scale: np.ndarray | None = None, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, float32 codes) blocks of an (N, D) h5 dataset or array; memory ~ two blocks.

    With `rng`: pieces of PIECE_ROWS rows in shuffled order, rows shuffled within each block
    (caches are sorted by class, so a block mixes pieces from all over the file); without, the
    rows in order. `mean`/`scale`: standardise on the fly. Blocks are views of one buffer:
    use each before asking for the next.
    """
    n, d = features.shape
    starts = np.arange(0, n, PIECE_ROWS)
    if rng is not None:
        starts = rng.permutation(starts)
    per_block = max(1, block_bytes // (4 * max(d, 1) * PIECE_ROWS))
    buf = np.empty((min(per_block * PIECE_ROWS, n), d), np.float32)
    mean32 = None if mean is None else mean.astype(np.float32)
    scale32 = None if scale is None else scale.astype(np.float32)
    for i in range(0, len(starts), per_block):
        group = starts[i:i + per_block]
        idx = np.concatenate([np.arange(s, min(s + PIECE_ROWS, n)) for s in group])
        at = 0
        for s in group:
            e = min(s + PIECE_ROWS, n)
            read_rows(features, s, e, buf[at:at + e - s])
            at += e - s
        x = buf[:at]
        if rng is not None:
            p = rng.permutation(len(idx))
            idx, x = idx[p], x[p]
        if mean32 is not None:
            x -= mean32
            x /= scale32
        yield idx, x


def read_rows(features, start: int, stop: int, out: np.ndarray) -> None:
    if isinstance(features, h5py.Dataset) and features.dtype == np.float32:
        features.read_direct(out, np.s_[start:stop])
    else:
        out[...] = features[start:stop]


def code_stats(features, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale (std, 1 where constant) in one streaming pass.

    Raises CnnCodesError naming the split and the count of codes holding NaN/inf.
    """
    n, d = features.shape
    count, mean, m2, bad = 0, np.zeros(d), np.zeros(d), 0
    for _, x in iter_blocks(features):
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad += int((~finite).sum())
            x = x[finite]
        if not len(x):
            continue
        # Chan et al.'s pairwise update (stable for millions of rows); float64 sums, float32 temporaries.
        bm, bn = x.mean(axis=0, dtype=np.float64), len(x)
        x -= bm.astype(np.float32)
        np.square(x, out=x)
        delta = bm - mean
        mean = mean + delta * bn / (count + bn)
        m2 = m2 + x.sum(axis=0, dtype=np.float64) + delta ** 2 * count * bn / (count + bn)
        count += bn
    if bad:
        raise nonfinite_error(split, bad, n)
    std = np.sqrt(m2 / max(count, 1))
    scale = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max(initial=0))), std, 1.0)
    return mean, scale


def nonfinite_error(split: str, bad: int, n: int) -> CnnCodesError:
    return CnnCodesError(f"{split}: {bad} of {n} codes hold NaN/inf values; the cache is damaged or the backbone "
                         f"diverged: re-extract with `cnncodes extract --overwrite` (try --precision fp32)")



@dataclass
class TrainSet:
    """The train split as the solvers see it: codes (h5 dataset, or standardised array) and row tags."""

    features: object  # h5py.Dataset (streamed, standardised per block) or np.ndarray (already standardised)
    y: np.ndarray  # index into `classes` (the classes present in train)
    groups: np.ndarray  # source image per row
    views: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    classes: np.ndarray  # cache class indices present in train, sorted

    @property
    def in_memory(self) -> bool:
        return isinstance(self.features, np.ndarray)

    @property
    def std_args(self) -> dict:
        """mean/scale for `iter_blocks`: none when the array is already standardised."""
        return {} if self.in_memory else {"mean": self.mean, "scale": self.scale}


def load_train(cache, in_memory: bool | None = None, exclude: Exclusions | None = None) -> TrainSet:
    """Validate the train split, compute the standardiser (streaming) and load it if it fits.

    in_memory: True/False forces; None loads when smaller than IN_MEMORY_BYTES. exclude: images left out (all
    their views), the standardiser computed without them; the kept rows are then held in memory.
    """
    if exclude is not None and "train" in cache.splits:
        return _load_train_without(cache, exclude)
    if "train" not in cache.splits:
        have = ", ".join(cache.splits) or "none"
        raise CnnCodesError(f"{cache.path}: no 'train' split (splits: {have}); a head is fitted on train: "
                            f"extract DATA/train/<class>/<image> (or DATA/<class>/<image>)")
    feats = cache.features("train")
    labels = cache.labels("train")
    if len(labels) == 0:
        raise CnnCodesError(f"{cache.path}: the train split has no codes (all images skipped?); see `cnncodes info {cache.path}`")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise CnnCodesError(f"{cache.path}: the train split has only one class ('{cache.classes[classes[0]]}'); "
                            f"a classifier needs training images of at least 2 classes")
    groups = image_groups(cache, "train")
    mean, scale = code_stats(feats, "train")
    nbytes = feats.shape[0] * feats.shape[1] * 4
    if in_memory or (in_memory is None and nbytes <= IN_MEMORY_BYTES):
        x = np.empty(feats.shape, np.float32)
        for lo in range(0, len(x), 65536):
            read_rows(feats, lo, min(lo + 65536, len(x)), x[lo:lo + 65536])
        x -= mean.astype(np.float32)
        x /= scale.astype(np.float32)
        feats = x
    return TrainSet(feats, y.astype(np.int64), groups, cache.views("train"), mean, scale, classes)


def _load_train_without(cache, exclude: Exclusions) -> TrainSet:
    """`load_train` without the train images `exclude` lists: the kept rows in memory, standardised by their
    own statistics (the head is the one fitted had those images never been there)."""
    drop = exclude.rows(cache, "train")
    if drop.all():
        raise CnnCodesError(f"{cache.path}: --exclude {', '.join(exclude.files)} lists every train image; nothing is left to fit")
    full = load_train(cache, in_memory=True)
    keep = ~drop
    x = full.features[keep] * full.scale.astype(np.float32) + full.mean.astype(np.float32)  # back to the codes
    classes, y = np.unique(full.classes[full.y[keep]], return_inverse=True)
    if len(classes) < 2:
        raise CnnCodesError(f"{cache.path}: --exclude {', '.join(exclude.files)} leaves train images of one class only "
                            f"('{cache.classes[classes[0]]}'); a classifier needs 2")
    mean, scale = code_stats(x, "train")
    x -= mean.astype(np.float32)
    x /= scale.astype(np.float32)
    return TrainSet(x, y.astype(np.int64), full.groups[keep], full.views[keep], mean, scale, classes)


@dataclass(frozen=True)
class Exclusions:
    """Images to leave out, read from CSV files with a `path` column (as the cache records paths) and an optional
    `split` column (audit's label_issues.csv and leaks.csv): split name ('' = any split) -> paths."""

    files: tuple[str, ...]
    paths: dict[str, frozenset[str]]

    def for_split(self, split: str) -> frozenset[str]:
        return self.paths.get(split, frozenset()) | self.paths.get("", frozenset())

    def rows(self, cache, split: str) -> np.ndarray:
        """Which rows of `split` belong to a listed image (all its views: they share the path)."""
        listed = self.for_split(split)
        if not listed:
            return np.zeros(len(cache.views(split)), bool)
        return np.isin(cache.paths(split), np.array(sorted(listed), dtype=object))


EXCLUDE_COLUMNS = ("path", "split")  # the columns --exclude reads; others (given, score, ...) are ignored


def read_exclusions(files: Sequence[str]) -> Exclusions | None:
    """The images CSV `files` list (None when there are no files); a missing file or `path` column is one line."""
    import csv

    if not files:
        return None
    paths: dict[str, set[str]] = {}
    for name in files:
        try:
            with open(name, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if EXCLUDE_COLUMNS[0] not in (reader.fieldnames or []):
                    raise CnnCodesError(f"{name}: no '{EXCLUDE_COLUMNS[0]}' column; --exclude reads a CSV with a path "
                                        f"column (and optionally split), like audit's label_issues.csv or leaks.csv")
                for row in reader:
                    paths.setdefault((row.get(EXCLUDE_COLUMNS[1]) or "").strip(), set()).add(row[EXCLUDE_COLUMNS[0]])
        except (OSError, UnicodeDecodeError) as e:
            raise CnnCodesError(f"{name}: cannot read it as a CSV ({getattr(e, 'strerror', None) or e}); pass the "
                                f"label_issues.csv or leaks.csv an audit wrote") from None
    return Exclusions(tuple(map(str, files)), {k: frozenset(v) for k, v in paths.items()})


def load_train_for(cache, clfs: Sequence[str], log: Callable[[str], None], *, folds: int,
                   in_memory: bool = False, exclude: Exclusions | None = None) -> TrainSet:
    """The train split as the heads `clfs` need it: in memory when `in_memory` or any of them is svm/logreg (each
    refused in one line by `check_memory` when it cannot fit), else loaded only if small (`load_train`)."""
    in_ram = [clf for clf in clfs if clf not in TORCH_CLFS]
    if "train" in cache.splits:  # else load_train says what is missing
        for clf in in_ram:
            check_memory(clf, cache.features("train").shape, cache.path, log, n_classes=len(cache.classes),
                         folds=folds)
    return load_train(cache, in_memory=True if in_memory or in_ram else None, exclude=exclude)


def image_groups(cache, split: str, chunk: int = 16384) -> np.ndarray:
    """One id per source image, like `Cache.groups`, reading the paths in chunks (memory ~ chunk).

    Relies on the cache layout (an image's rows are contiguous, its plain view first) and
    checks it: a new path must start exactly where views == 0.
    """
    paths = cache.require_split(split)["paths"]
    views = cache.views(split)
    ids = np.empty(len(views), np.int64)
    last, current = None, -1
    for lo in range(0, len(views), chunk):
        p = np.asarray(paths.asstr()[lo:lo + chunk], dtype=object)
        new = np.r_[p[0] != last, p[1:] != p[:-1]].astype(bool)
        if not np.array_equal(new, views[lo:lo + chunk] == 0):
            raise CnnCodesError(f"{cache.path}: {split} rows are not grouped by image (plain view first); the cache is "
                                f"damaged: re-extract with `cnncodes extract --overwrite`")
        ids[lo:lo + chunk] = current + np.cumsum(new)
        current, last = ids[min(lo + chunk, len(ids)) - 1], p[-1]
    return ids



def check_memory(clf: str, shape: tuple[int, int], path, log: Callable[[str], None], *, n_classes: int,
                 folds: int) -> None:
    """Refuse an in-memory head that cannot fit in RAM; point to the streaming heads.

    Every in-memory head holds the codes and the L-BFGS path's working memory (`lbfgs_bytes`)."""
    values = shape[0] * shape[1]
    need = values * CODE_BYTES + lbfgs_bytes(*shape, n_classes, folds)
    free = available_memory()
    hint = f"--clf {'linear-svm' if clf == 'svm' else 'linear'} streams the codes from the cache in bounded memory"
    if need > free:
        raise CnnCodesError(f"{path}: --clf {clf} needs about {need / 2**30:.1f} GiB for {values / 1e6:.0f}M code values, "
                            f"{free / 2**30:.1f} GiB are available: {hint}")


def lbfgs_bytes(n: int, d: int, n_classes: int, folds: int) -> int:
    """What the L-BFGS path (`lbfgs`) holds besides the codes, about: the fold models' M x K x (D' + 1) unknowns
    (D' = n in the codes' row space when n < D) in its 2 x LBFGS_MEMORY curvature vectors, ~8 working copies and
    the Newton check's ~6 conjugate-gradient vectors, in float64 once a fit is polished so (8 bytes); ~10
    score-sized (M, n, K) tensors per objective or Hessian product; the float64 copy of the codes a polish uses;
    when n < D, the float64 QR of the codes (16 bytes per value); and up to 4,096 rows, the svm's direct Newton
    steps' float64 Gram matrix and one block of it (`lbfgs.GRAM_ROWS`), and the factors they keep (at most 256 MiB,
    `lbfgs.FACTOR_BYTES`). M = the fold models (one above HOLDOUT_ABOVE codes)."""
    models = 1 if n > HOLDOUT_ABOVE else folds
    unknowns = models * n_classes * (min(n, d) + 1)
    return (8 * unknowns * (2 * LBFGS_MEMORY + 14) + 8 * 10 * models * n * n_classes + 8 * n * min(n, d)
            + (16 * n * d if n < d else 0) + (16 * n * n + (1 << 28) if n <= 4096 else 0))


def available_memory() -> int:
    """MemAvailable (Linux), else free physical memory, else 8 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30

