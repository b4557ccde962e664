"""Image folders: split/class discovery, robust decoding to RGB, presets and loaders.

Data flow: a folder -> `discover()` -> `FolderLayout` (one list of `ImageFile` per split)
-> `ImageFiles` dataset (decodes, applies a preset, never raises on a bad file)
-> `make_loader()` batches of uint8 tensors -> `Normalize` on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import ImageFile as PILImageFile
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from . import imageops
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, FolderLayout, ImageFile, discover  # noqa: F401  (re-exported)
from .runtime import process_cores
from .tvimport import torchvision  # the process's first torchvision import: without torch._dynamo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PILImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-used


# --------------------------------------------------------------------------- decoding


JPEG_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture phone JPEGs, whose first picture decodes like any JPEG


class BadImage(Exception):
    """Raised by `load_rgb` with a short reason; the file is skipped, not fatal."""


def load_rgb(path: str | os.PathLike | bytes, draft_size: int | None = None) -> Image.Image:
    """Decode an image file (or its bytes, e.g. a WebDataset sample's) to an 8-bit RGB PIL image
    with EXIF orientation applied: the same decoder for both, so the same bytes give the same pixels.

    Grayscale, palette, alpha (composited on white), CMYK and 16-bit images are converted.
    `draft_size` lets JPEG decode at a reduced scale (DCT scaling) while keeping both
    sides >= draft_size: a large speed-up for big photos, no effect on small ones.
    Raises BadImage with a reason for zero-byte, truncated, corrupt or non-image files.
    """
    try:
        in_memory = isinstance(path, (bytes, bytearray))
        if (len(path) if in_memory else os.path.getsize(path)) == 0:
            raise BadImage("empty file (0 bytes)")
        with quiet_pil():
            with Image.open(io.BytesIO(path) if in_memory else path) as im:
                if draft_size and im.format in JPEG_FORMATS:
                    im.draft("RGB", (draft_size, draft_size))
                im.load()
                ImageOps.exif_transpose(im, in_place=True)  # the default copies every image
                return to_rgb(im)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large for PIL's decompression-bomb limit ({e}); downscale it") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image (unknown format or corrupt header)") from None
    except PermissionError:
        raise BadImage("permission denied; make the file readable") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        raise BadImage(f"corrupt or truncated image ({msg})") from None
    except Exception as e:  # any other decoder failure is still one bad file, not a crash
        raise BadImage(f"cannot decode image ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def quiet_pil() -> Iterator[None]:
    """Silence PIL's EXIF/ICC chatter (real failures raise). Warning filters are process-wide
    and catch_warnings is not thread-safe, so only the main thread installs the filter;
    `ThreadedLoader` installs it around its decode threads."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # The mode, not the pixel values, gives the range: 16-bit (I;16*, and I, what 16-bit PNGs
        # open as in older Pillow) is scaled 65535 -> 255, so a dark 16-bit image stays dark
        # instead of jumping 257x brighter when its maximum happens to be <= 255. F is taken as 0..255.
        arr = np.asarray(im, dtype=np.float32)
        if im.mode != "F":
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preprocessing:
    """Eval transform (Resize + CenterCrop) and seeded augmented views, as uint8 CHW tensors.

    Normalisation (mean/std) is applied per batch on the device by `Normalize`, so workers
    ship 4x less data and the GPU does the arithmetic.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    view_scale: tuple[float, float] = (0.08, 1.0)

    @classmethod
    def for_image_size(cls, crop: int, base: Preprocessing | None = None) -> Preprocessing:
        """Keep the base's resize/crop ratio (256/224) at a new crop size."""
        base = base or cls()
        return replace(base, resize=int(round(crop * base.resize / base.crop)), crop=crop)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d.pop("jpeg_draft", None)
        d.pop("resampler", None)
        for key in ("mean", "std", "view_scale"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # JSON-stable
        d["jpeg_draft"] = f"JPEG decoded at the smallest DCT scale keeping both sides >= {self.draft_size}"
        d["resampler"] = "torch antialiased resize of uint8 tensors"  # codes differ slightly from PIL's
        return d

    @property
    def draft_size(self) -> int:
        # 2x the resize target keeps enough pixels for small random crops too.
        return 2 * self.resize

    def load(self, path: str | os.PathLike | bytes) -> Image.Image:
        return load_rgb(path, self.draft_size)

    def eval_view(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """Resize the short side, then center-crop, as uint8 (3, crop, crop)."""
        t = imageops.resize(as_tensor(img), self.resize, self.interpolation)
        return imageops.center_crop(t, self.crop)

    def random_view(self, img: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """RandomResizedCrop + horizontal flip; reproducible when `generator` is seeded."""
        t = as_tensor(img)
        top, left, h, w = _random_crop_params(t.shape[-1], t.shape[-2], self.view_scale, generator)
        t = imageops.resized_crop(t, top, left, h, w, self.crop, self.interpolation)
        if torch.rand(1, generator=generator).item() < 0.5:
            t = imageops.hflip(t)
        return t


def as_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor; tensors pass through.

    The views resize uint8 tensors rather than PIL images: torch's antialiased uint8 kernel
    is ~3x faster than PIL's and within 1 grey level of it.
    """
    return img if isinstance(img, torch.Tensor) else torchvision.transforms.functional.pil_to_tensor(img)


def _random_crop_params(width: int, height: int, scale, generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `generator` (torch's global one if None)."""
    area = height * width
    log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round((target_area * aspect) ** 0.5))
        h = int(round((target_area / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * 4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def view_seed(seed: int, path: str, view: int) -> int:
    """A stable per-(image, view) seed: same views whatever the batch, worker or resume."""
    digest = hashlib.sha256(f"{seed}\0{path}\0{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Normalize(torch.nn.Module):
    """uint8 NCHW batch -> normalised float batch on `device`, optionally channels_last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# --------------------------------------------------------------------------- loading


class ImageFiles(Dataset):
    """Files -> (index, tensor or None, error or None). Bad files never raise here.

    `transform(img, index)` turns a decoded RGB image into a tensor; the index lets
    extraction seed per-image views and fine-tuning draw fresh crops.
    """

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], load: Callable, transform: Callable):
        self.root = Path(root)
        self.paths = list(paths)
        self.load = load
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            img = self.load(self.root / self.paths[index])
            return index, self.transform(img, index), None
        except BadImage as e:
            return index, None, str(e)


@dataclass
class Batch:
    indices: torch.Tensor  # positions in the dataset of the good samples
    images: torch.Tensor  # uint8, stacked
    failed: list[tuple[int, str]]  # (position, reason) of skipped files

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) pins custom batches only through this method.
        return Batch(self.indices.pin_memory(), self.images.pin_memory(), self.failed)


def collate_skipping(samples) -> Batch:
    good = [(i, t) for i, t, err in samples if err is None]
    failed = [(i, err) for i, t, err in samples if err is not None]
    if good:
        images = torch.stack([t for _, t in good])
    else:
        images = torch.empty(0, dtype=torch.uint8)
    return Batch(torch.tensor([i for i, _ in good], dtype=torch.long), images, failed)


def default_workers(device: torch.device, cores: int) -> int:
    """Decode worker processes for a process that may use `cores` cores.

    On CUDA the workers feed the GPU from otherwise idle cores. On CPU the network and the
    decoding share the same cores: a worker process decoding beside the network's threads
    stalls them (on 2 cores one worker gave 0.78 of the in-memory ceiling for a resnet18
    train step, inline decoding 0.94), so small machines decode in the main process, on a
    pool of threads between forward passes, and big ones add one worker per ~24 cores.
    """
    if device.type == "cuda":
        return max(1, cores - 1)  # every spare core: capped at 8, a 16-core H100 host was decode-bound
    return 0 if cores <= 3 else max(1, cores // 24)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-image; torch threads would oversubscribe


class ThreadedLoader:
    """DataLoader's batches with no worker processes: each batch is decoded by `threads`
    threads of this process, between forward passes, so decoding and the network take
    turns on the same cores instead of fighting over them (PIL and torch release the GIL
    while they decode and resize)."""

    def __init__(self, dataset: Dataset, batch_sampler: BatchSampler, threads: int, pin: bool = False):
        self.dataset, self.batch_sampler, self.threads, self.pin = dataset, batch_sampler, threads, pin

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            for indices in self.batch_sampler:
                with quiet_pil():  # not held across the yield: the caller's warnings stay as they are
                    samples = list(pool.map(self.dataset.__getitem__, indices))
                batch = collate_skipping(samples)
                yield batch.pin_memory() if self.pin else batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int | None,
    device: torch.device,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    threads: int | None = None,
) -> DataLoader | ThreadedLoader:
    """Batches of `Batch` in sampler order: pinned memory on CUDA, quiet workers, bad files
    reported not raised. `threads` None = this process's share of the cores (torchrun aware);
    `workers` None = `default_workers` for them; with no workers the main process decodes on
    `threads` threads."""
    if threads is None:
        threads = process_cores()
    if workers is None:
        workers = default_workers(device, threads)
    pin = device.type == "cuda"
    if not workers and threads > 1:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return ThreadedLoader(dataset, BatchSampler(sampler, batch_size, drop_last=False), threads, pin)
    if workers:
        # Share batches by shm name, not by passing fds through multiprocessing's resource_sharer
        # thread, which prints tracebacks when Ctrl-C lands mid-handoff.
        torch.multiprocessing.set_sharing_strategy("file_system")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=pin,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        generator=generator,
    )
