"""The network side of `extract`: `Runner` builds the headless backbone once and turns batches of
decoded views into codes; `ViewMaker` makes an image's eval and seeded augmented views."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .._version import __version__
from ..backbones import create_extractor
from ..data import Normalize, Preprocessing, as_tensor, view_seed
from ..gpu_decode import DecodeStats
from ..runtime import autocast, configure_threads
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
    """The headless backbone on a device, turning batches of views into codes.

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
