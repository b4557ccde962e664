"""The extraction loop: a headless backbone over a split's files, codes buffered into shards.

`Runner` builds the model once and runs it split by split; `ShardWriter` turns finished batches
into atomic shard files in `<cache>.parts/` (what a rerun after a crash picks up).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import distributed
from .._version import __version__
from ..backbones import create_extractor
from ..data import FolderLayout, ImageFile, ImageFiles, Normalize, Preprocessing, as_tensor, make_loader, view_seed
from ..errors import CnnCodesError, Interrupted
from ..gpu_decode import DecodeStats, DeviceLoader
from ..runtime import autocast, configure_threads, process_cores
from ..store import SplitRows, last_shard_seq, shard_path, write_shard
from ..tvimport import torchvision  # without torch._dynamo
from .config import ExtractConfig


def library_versions() -> dict[str, str]:
    """The versions a cache (or a sharded store's index) records of what computed its codes."""
    return {"cnncodes": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}


class ViewMaker:
    """Decoded image -> (1 + K, 3, H, W) uint8: the eval view, then K seeded augmented views."""

    GROUP = 16  # images resized in one call at most: bounds the stacked copy (16 12-MP photos: 0.6 GB uint8)

    def __init__(self, pre: Preprocessing, paths: list[str], views: int, seed: int):
        self.pre, self.paths, self.views, self.seed = pre, paths, views, seed

    def __call__(self, img: Image.Image | torch.Tensor, index: int) -> torch.Tensor:
        img = as_tensor(img)
        return torch.stack([self.pre.eval_view(img), *self._random_views(img, index)])

    def many(self, images: list[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
        """The views of several decoded images; the eval views of same-sized images are made in one
        call (one resize kernel launch per size on a GPU instead of one per image)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(j)
        chunks = [js[k:k + self.GROUP] for js in groups.values() for k in range(0, len(js), self.GROUP)]
        evals: dict[int, torch.Tensor] = {}
        for js in chunks:
            stacked = images[js[0]].unsqueeze(0) if len(js) == 1 else torch.stack([images[j] for j in js])
            evals.update(zip(js, self.pre.eval_view(stacked)))
        return [torch.stack([evals[j], *self._random_views(img, i)]) for j, (img, i) in enumerate(zip(images, indices))]

    def _random_views(self, img: torch.Tensor, index: int) -> list[torch.Tensor]:
        out = []
        for k in range(1, self.views + 1):
            g = torch.Generator().manual_seed(view_seed(self.seed, self.paths[index], k))
            out.append(self.pre.random_view(img, g))
        return out


def to_channels_last(model: torch.nn.Module, log=None) -> bool:
    """Convert `model` to channels_last in place; False (kept as is, said in the log) where it holds
    a parameter or buffer of another rank (e.g. a traced timm Swin's 5-d attention mask)."""
    try:
        model.to(memory_format=torch.channels_last)
        return True
    except RuntimeError as e:
        if "channels_last" not in str(e):
            raise
        if log:
            log("note: the model holds tensors that are not 4-d, so it runs in the default memory layout "
                "(channels_last skipped; same codes)")
        return False


class Runner:
    """Runs the headless backbone over the files still to do, writing shards as it goes.

    `options` as given to `extract`, with batch_size and decode resolved ("cpu" or "gpu");
    `cache` the configuration the cache records (its layers already parsed).
    """

    decode_many = None  # the device path's batch decoder (None: torchvision's); tests inject fakes

    def __init__(self, options: ExtractConfig, cache, info, pre: Preprocessing, dev: torch.device, log=None):
        configure_threads(dev)
        self.model, _, self.dim = create_extractor(cache.arch, info, layers=cache.layers, log=log)
        # How the codes were computed beyond the config (fast paths within float rounding): the cache records it.
        channels_last = options.channels_last and to_channels_last(self.model, log)
        self.computed_with = {"batchnorm": getattr(self.model, "batchnorm_folding", "not folded"),
                              "channels_last": channels_last}
        self.model = self.model.to(dev)
        self.normalize = Normalize(pre.mean, pre.std, options.channels_last).to(dev)
        self.options, self.config, self.pre, self.dev = options, cache, pre, dev
        self.decode_stats = DecodeStats()  # images each decoder did, and why any fell back

    @torch.inference_mode()
    def codes(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, V, 3, H, W) -> float32 (B * V, D) codes, in forward passes of <= batch_size rows."""
        x = images.flatten(0, 1).to(self.dev, non_blocking=True)
        with autocast(self.dev, self.options.precision):
            rows = x.split(self.options.batch_size)
            return torch.cat([self.model(self.normalize(r)).float() for r in rows]).cpu().numpy()

    def run(self, layout: FolderLayout, todo: dict[str, list[ImageFile]], parts: Path, progress: bool):
        """Extract every file of `todo`; (images, codes, seconds of the loop)."""
        total = sum(len(v) for v in todo.values())
        bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
        images = codes = 0
        start = time.perf_counter()
        try:
            for split, files in todo.items():
                if files:
                    n_img, n_codes = self._run_split(layout, split, files, parts, bar)
                    images += n_img
                    codes += n_codes
        finally:
            bar.close()
        return images, codes, time.perf_counter() - start

    def _run_split(self, layout, split, files, parts, bar) -> tuple[int, int]:
        paths = [f.path for f in files]
        k = self.config.views_for(split)
        dataset = ImageFiles(layout.root, paths, self.pre.load, ViewMaker(self.pre, paths, k, self.config.seed))
        batch_size, workers = self.options.batch_size, self.options.workers  # workers None: sized to the machine
        if self.options.decode == "gpu":
            loader = DeviceLoader(layout.root, paths, self.pre.load, dataset.transform, batch_size, self.dev,
                                  workers or process_cores(), decode_many=self.decode_many)
        else:
            loader = make_loader(dataset, batch_size, workers, self.dev)
        shard = ShardWriter(parts, split, k + 1, distributed.rank())
        images = codes = 0
        try:
            for batch in loader:
                for i, reason in batch.failed:
                    if self.options.strict:
                        raise CnnCodesError(f"{layout.root / files[i].path}: {reason} (--strict: fix or remove the file, or drop --strict to skip it)")
                    shard.skip(files[i], reason)
                if len(batch.indices):
                    feats = self.codes(batch.images)
                    shard.add([files[i] for i in batch.indices.tolist()], feats)
                    images += len(batch.indices)
                    codes += len(feats)
                bar.update(len(batch.indices) + len(batch.failed))
                if shard.age() > self.options.checkpoint_every:
                    shard.flush()
        except KeyboardInterrupt:
            shard.flush()
            raise Interrupted(f"stopped; finished batches are saved in {parts}; rerun the same command to continue") from None
        shard.flush()
        if isinstance(loader, DeviceLoader):
            self.decode_stats.add(loader.stats)
        else:
            self.decode_stats.cpu += images
        return images, codes


class ShardWriter:
    """Buffers finished batches and writes them as one atomic shard file per flush."""

    def __init__(self, parts: Path, split: str, rows_per_image: int, rank: int = 0):
        self.parts, self.split, self.rows_per_image, self.rank = parts, split, rows_per_image, rank
        self.seq = last_shard_seq(parts, split, rank)
        self._reset()

    def _reset(self) -> None:
        self.feats: list[np.ndarray] = []
        self.files: list[ImageFile] = []
        self.skipped: list[tuple[ImageFile, str]] = []
        self.started = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self.started

    def add(self, files: list[ImageFile], feats: np.ndarray) -> None:
        self.files.extend(files)
        self.feats.append(feats)

    def skip(self, f: ImageFile, reason: str) -> None:
        self.skipped.append((f, reason))

    def flush(self) -> None:
        if not self.files and not self.skipped:
            return
        v = self.rows_per_image
        dim = self.feats[0].shape[1] if self.feats else 0
        records = [(f.path, f.size, f.mtime_ns) for f in self.files + [f for f, _ in self.skipped]]
        rows = SplitRows(
            features=np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32),
            labels=np.repeat([f.label for f in self.files], v).astype(np.int64),
            paths=[f.path for f in self.files for _ in range(v)],
            views=np.tile(np.arange(v), len(self.files)),
            files=records,
            skipped=[(f.path, reason) for f, reason in self.skipped],
        )
        self._reset()  # before writing: a Ctrl-C inside the write must not flush these rows twice
        self.seq += 1
        write_shard(shard_path(self.parts, self.split, self.rank, self.seq), rows)
