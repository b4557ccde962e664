"""Outliers: images far from every other image. The score is the mean cosine distance of the raw codes to the k
nearest neighbours (cleanlab's `OutOfDistribution` score from features, before its exponential, on the neighbour
search already run); an image is listed when its robust z-score against train (median, 1.4826 x MAD) passes a
threshold. Raw, not centred, codes: centring makes every weakly activated image point the same way (minus the
mean), so ants/bees' "image not found" placeholder ranks 367th of 398 by centred cosine and 1st by raw (z 10.2;
bench/results/audit_threshold.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import Images
from .neighbours import Neighbours

MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass
class Outliers:
    flagged: np.ndarray  # image indices, most distant first
    score: np.ndarray  # (N,) mean cosine distance to the k nearest neighbours
    z: np.ndarray  # (N,) robust z-score against train
    nearest_class: np.ndarray  # per flagged image, the most common label among its neighbours
    median: float
    spread: float  # 1.4826 x MAD of the train scores


def find_outliers(images: Images, nbrs: Neighbours, threshold: float) -> Outliers:
    """Score every image by its neighbours, flag those whose robust z-score exceeds `threshold`."""
    found = nbrs.index >= 0
    dist = np.where(found, 1.0 - nbrs.similarity, 0.0)
    score = dist.sum(axis=1) / np.maximum(found.sum(axis=1), 1)
    train = images.splits == "train"
    median = float(np.median(score[train])) if train.any() else 0.0
    spread = MAD_TO_SD * float(np.median(np.abs(score[train] - median))) if train.any() else 0.0
    z = (score - median) / max(spread, 1e-12)
    flagged = np.flatnonzero(z > threshold)
    flagged = flagged[np.argsort(-score[flagged], kind="stable")]
    return Outliers(flagged, score, z, _nearest_class(images, nbrs, flagged), median, spread)


def _nearest_class(images: Images, nbrs: Neighbours, rows: np.ndarray) -> np.ndarray:
    """The most common label among the neighbours of each image of `rows` (its own where it has none)."""
    out = np.empty(len(rows), np.int64)
    for n, i in enumerate(rows):
        found = nbrs.index[i][nbrs.index[i] >= 0]
        out[n] = np.bincount(images.labels[found]).argmax() if len(found) else images.labels[i]
    return out
