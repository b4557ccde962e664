"""The images an audit looks at: one code per image (its plain view) from every split, centred on the train
mean and scaled to unit length (cosine = dot product; the raw codes' cosines follow from the lengths and the mean
removed), and where the image files are on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CnnCodesError
from ..heads.codes import iter_blocks, nonfinite_error


@dataclass
class Images:
    """Every image of the cache, train first: path (as the cache records it), split, label, unit code."""

    paths: np.ndarray  # object (N,)
    splits: np.ndarray  # object (N,)
    labels: np.ndarray  # int64 (N,), index into `classes`
    codes: np.ndarray  # float32 (N, D): plain-view codes, centred on the train mean, unit length
    length: np.ndarray  # float32 (N,): the centred codes' lengths (raw code = length * code + mean)
    mean: np.ndarray  # float32 (D,): the train mean removed
    classes: list[str]
    root: Path | None = None  # the folder the paths are relative to, when the files are on disk

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path | None:
        """Image i's file, or None when the files are not on disk."""
        return None if self.root is None else self.root / self.paths[i]

    def raw_unit(self, rows) -> np.ndarray:
        """The raw codes of `rows` (an index or slice), unit length."""
        raw = self.codes[rows] * self.length[rows, None] + self.mean
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)

    def counts(self) -> dict[str, int]:
        names, n = np.unique(self.splits.astype(str), return_counts=True)
        return {str(s): int(c) for s, c in zip(names, n)}


def load_images(cache, data: str | None = None) -> Images:
    """The plain-view code of every image of every split (train first), checked for NaN/inf, centred and
    normalised; `data` (or a manifest's folder) where the files are, checked against the cache's paths."""
    splits = ["train", *sorted(s for s in cache.splits if s != "train")]
    paths, names, labels, codes = [], [], [], []
    for split in splits:
        views = cache.views(split)
        plain = np.flatnonzero(views == 0)
        x = plain_codes(cache.features(split), plain)
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        if bad:
            raise nonfinite_error(f"{cache.path}: {split}", bad, len(x))
        paths.append(cache.paths(split)[plain])
        names.append(np.full(len(plain), split, dtype=object))
        labels.append(cache.labels(split)[plain])
        codes.append(x)
    x = np.concatenate(codes)
    n_train = len(paths[0])
    # Centred (label-free), recompressed copies stand out most: raw ReLU codes all share the mean's direction
    # (bench/results/audit_threshold.json: distinct images reach cosine 0.89 raw, 0.81 centred; copies >= 0.97, 0.92).
    mean = x[:n_train].mean(axis=0, dtype=np.float64).astype(np.float32)
    x -= mean
    length = np.linalg.norm(x, axis=1)
    x /= np.maximum(length, 1e-12)[:, None]
    images = Images(np.concatenate(paths), np.concatenate(names), np.concatenate(labels), x, length, mean,
                    list(cache.classes))
    images.root = image_root(cache, data, images.paths)
    return images


def plain_codes(features, rows: np.ndarray) -> np.ndarray:
    """features[rows] as float32, read in blocks (an h5 fancy index over many rows is slow)."""
    out = np.empty((len(rows), features.shape[1]), np.float32)
    if len(rows) == features.shape[0]:
        for idx, x in iter_blocks(features):
            out[idx] = x
        return out
    want = np.zeros(features.shape[0], bool)
    want[rows] = True
    position = np.cumsum(want) - 1
    for idx, x in iter_blocks(features):
        keep = want[idx]
        out[position[idx[keep]]] = x[keep]
    return out


def image_root(cache, data: str | None, paths: np.ndarray) -> Path | None:
    """The folder the cache's image paths are relative to: `data`, else a CSV manifest's folder; None when the
    files are not known (a folder cache without `data`, a WebDataset store). `data` must hold the images."""
    manifest = cache.manifest
    if data is None:
        if manifest is None:
            return None
        data = str(Path(manifest["path"]).parent)
    root = Path(data)
    if root.is_file() and root.suffix.lower() == ".csv":
        root = root.parent  # the manifest itself was given: its paths are relative to its folder
    sample = paths[:: max(1, len(paths) // 20)][:20]
    if not root.is_dir() or not any((root / p).is_file() for p in sample):
        raise CnnCodesError(f"{data}: none of the cache's images (e.g. {sample[0]}) are under it; pass --data the "
                            f"folder (or CSV manifest) that was given to `cnncodes extract`")
    return root
