"""Resize, crop and flip of uint8 image tensors (..., C, H, W), with the results of
`torchvision.transforms.v2.functional` (tested equal on the CPU).

Not v2 itself: importing it imports torch._dynamo (its tv_tensors use `torch.compiler.disable`),
about 1 s of every command's start-up on a 2-core CPU. These are the few calls the views need.

On the CPU, uint8 images are resized by torch's native uint8 antialiased kernels, as v2 does.
Elsewhere (CUDA) no uint8 antialiased kernel exists and v2 converts the full-resolution image to
float32; here it is float16 (exact for 0..255; CUDA's kernel accumulates in float32), half the
memory and traffic. `bench/device_check.py` measures the views' difference from the CPU's.
"""

from __future__ import annotations

import platform

import torch
from torch.nn import functional as F

# The interpolations implemented here; others (nearest, lanczos) go to torchvision's v2 kernels.
INTERPOLATIONS = ("bilinear", "bicubic")
DEVICE_RESIZE_DTYPE = torch.float16


def resize(img: torch.Tensor, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of a uint8 (..., C, H, W) tensor: `size` an int resizes the short side to
    it (v2's `resize(img, [size])`), a pair gives (H, W)."""
    *lead, c, h, w = img.shape
    out_h, out_w = (size if isinstance(size, tuple) else _short_side(h, w, size))
    if (out_h, out_w) == (h, w):
        return img
    if interpolation not in INTERPOLATIONS:
        from torchvision.transforms.v2 import functional as TF  # rare: pays the v2 import

        return TF.resize(img, [out_h, out_w], interpolation=TF.InterpolationMode(interpolation), antialias=True)
    x = img.reshape(-1, c, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 1 and x.numel() != x.stride(0):
        # A CHW view of an HWC image (PIL's): restride so torch allocates a channels_last output,
        # which saves the uint8 kernel a re-pack (the same trick as v2's).
        strides = list(x.stride())
        strides[0] = x.numel()
        x = x.as_strided(x.shape, strides)
    native = _native_uint8(x, interpolation)
    if not native:
        x = x.to(torch.float32 if x.device.type == "cpu" else DEVICE_RESIZE_DTYPE)
    y = F.interpolate(x, size=[out_h, out_w], mode=interpolation, align_corners=False, antialias=True)
    if not native:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y.reshape(*lead, c, out_h, out_w)


def _short_side(h: int, w: int, short: int) -> tuple[int, int]:
    """(H, W) with the short side `short` and the long side truncated as v2 does."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _native_uint8(x: torch.Tensor, interpolation: str) -> bool:
    """Whether torch resizes this uint8 tensor without a float copy (v2's rule on the CPU)."""
    if x.device.type != "cpu":
        return False
    if interpolation == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return True


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window (zero-padded where the image is smaller, as v2 does)."""
    h, w = img.shape[-2:]
    if size > h or size > w:
        ph, pw = max(size - h, 0), max(size - w, 0)
        img = F.pad(img, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2], value=0)
        h, w = img.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[..., top:top + size, left:left + size]


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """The box (inside the image) resized to size x size."""
    return resize(img[..., top:top + height, left:left + width], (size, size), interpolation)


def hflip(img: torch.Tensor) -> torch.Tensor:
    return img.flip(-1)
