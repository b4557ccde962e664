"""Helpers shared by the tests and the benches: synthetic caches in the `store` format."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .runtime import atomic_path

def write_synthetic_cache(path: str | Path, images: dict[str, int], dim: int = 512, n_classes: int = 10,
                          views: int = 0, eval_views: int = 0, separation: float = 3.0, seed: int = 0,
                          rank: int = 0) -> Path:
    """Write a cache in the `store` format with Gaussian class clusters, without holding it in memory.

    images: {split: number of source images}; train images get 1 + `views` rows, others
    1 + `eval_views`. Rows are sorted by class then image then view, like a real cache.
    `separation` is the distance between class means in units of the per-image noise.
    rank > 0: class means and per-image variation live in a rank-`rank` subspace whose
    directions carry power-law decaying variance (as in real CNN codes, where a few hundred
    directions hold most of it), plus small isotropic noise; 0: isotropic clusters.
    """
    import torch

    from . import __version__
    from .data import Preprocessing
    from .store import FORMAT, FORMAT_VERSION, ROW_CHUNK, STR, CacheConfig

    path = Path(path)
    rng = np.random.default_rng(seed)
    basis = None
    if rank:
        # latent (rank) -> code (dim): decaying scales, rows normalised so a code value has variance ~1
        scales = (1.0 + np.arange(rank)) ** -0.5
        basis = rng.normal(size=(rank, dim)) * (scales / np.sqrt((scales ** 2).sum()))[:, None]
    latent = rank or dim
    centers = rng.normal(size=(n_classes, latent)) * separation / np.sqrt(2 * latent)  # |c_i - c_j| ~ separation
    classes = [f"class{k:03d}" for k in range(n_classes)]
    config = CacheConfig("resnet18", "none:seed0", "none", "fp32", Preprocessing().to_dict(), views, eval_views, seed)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json(),
                        "preprocessing": json.dumps(config.preprocessing), "classes": json.dumps(classes),
                        "feature_dim": dim, "cnncodes_version": __version__, "torch_version": str(torch.__version__),
                        "torchvision_version": "synthetic"})
        for key in ("arch", "weights", "weights_name", "precision", "views", "eval_views", "seed"):
            f.attrs[key] = getattr(config, key)
        for s_i, (split, n_img) in enumerate(images.items()):
            per = 1 + (views if split == "train" else eval_views)
            _synthetic_split(f.create_group(split), n_img, per, centers, classes, ROW_CHUNK, STR, seed + 7919 * (s_i + 1),
                             basis)
    return path


def _synthetic_split(g: h5py.Group, n_img: int, per: int, centers: np.ndarray, classes: list[str],
                     chunk: int, str_dtype, seed: int, basis: np.ndarray | None = None) -> None:
    n, dim = n_img * per, centers.shape[1] if basis is None else basis.shape[1]
    label_of_image = (np.arange(n_img) * len(classes)) // max(n_img, 1)  # sorted by class, like a folder
    feats = g.create_dataset("features", shape=(n, dim), dtype=np.float32, maxshape=(None, dim) if n else None,
                             chunks=(min(chunk, n), dim) if n else None)
    step = max(1, (8 << 20) // (4 * dim * per))  # images per write: ~8 MB
    for lo in range(0, n_img, step):
        hi = min(lo + step, n_img)
        rng = np.random.default_rng([seed, lo])
        base = centers[label_of_image[lo:hi]] + rng.normal(size=(hi - lo, centers.shape[1]))
        if basis is not None:
            base = base @ basis
        rows = np.repeat(base, per, axis=0) + 0.3 * rng.normal(size=((hi - lo) * per, dim))
        feats[lo * per:hi * per] = np.maximum(rows + 1.0, 0).astype(np.float32)  # ReLU codes are >= 0
    image_paths = np.array([f"{classes[c]}/{i:07d}.jpg" for i, c in enumerate(label_of_image)], dtype=object)
    g.create_dataset("labels", data=np.repeat(label_of_image, per).astype(np.int64))
    g.create_dataset("paths", data=np.repeat(image_paths, per), dtype=str_dtype)
    g.create_dataset("views", data=np.tile(np.arange(per), n_img).astype(np.int16))
    files, skipped = g.create_group("files"), g.create_group("skipped")
    files.create_dataset("paths", data=image_paths, dtype=str_dtype)
    files.create_dataset("size", data=np.zeros(n_img, np.int64))
    files.create_dataset("mtime_ns", data=np.zeros(n_img, np.int64))
    skipped.create_dataset("paths", data=np.array([], dtype=object), dtype=str_dtype)
    skipped.create_dataset("reasons", data=np.array([], dtype=object), dtype=str_dtype)
