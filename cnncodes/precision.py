"""Numeric precision of forward passes: the names the CLI offers and what each one means.

Importable without torch (the CLI's option lists read `PRECISIONS` before parsing
arguments); torch is imported inside the functions that use it.

- fp32: true float32 on every device. PyTorch lets cuDNN convolutions use TF32 by default
  (`torch.backends.cudnn.allow_tf32 = True`), which on an H100 moved resnet50 codes by up
  to 1.3e-2 between batch sizes; fp32 turns TF32 off for convolutions and matmuls.
- tf32: float32 storage, TF32 tensor-core arithmetic (CUDA only): faster, ~1e-2 noise.
- bf16 / fp16: autocast (fp16 needs CUDA); ops autocast keeps in float32 stay TF32-free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import CnnCodesError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
CUDA_ONLY = {"tf32": "TF32 is an NVIDIA tensor-core format; on CPU use fp32 or bf16",
             "fp16": "on CPU use bf16 or fp32"}


def check_precision(precision: str, device: torch.device) -> None:
    """A clear error for an unknown precision or one the device cannot run."""
    if precision not in PRECISIONS:
        raise CnnCodesError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision in CUDA_ONLY and device.type != "cuda":
        raise CnnCodesError(f"--precision {precision} needs a CUDA device; {CUDA_ONLY[precision]}")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as oneDNN sees it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulation_note(precision: str, device: torch.device) -> str | None:
    """A note when `precision` will run emulated, hence slower than fp32 (bf16 on a CPU without
    bf16 instructions: resnet50 ran 7x slower than fp32 on an AVX2 machine). Said, never switched."""
    if precision != "bf16" or device.type != "cpu" or native_bf16():
        return None
    return ("--precision bf16: this CPU has no bf16 instructions (AVX-512 BF16/AMX), so bf16 is emulated and "
            "typically several times slower than fp32 here; use --precision fp32 on this machine")


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow or forbid TF32 in cuDNN convolutions and CUDA matmuls inside the block; the
    previous flags are restored on exit. Plain Python flags: harmless without a GPU.

    Uses the legacy `allow_tf32` flags only: mixing them with the newer `fp32_precision`
    API makes torch refuse to read them.
    """
    import torch

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward pass in `precision`: fp32 and tf32 without autocast, bf16/fp16 with it.

    Everything but tf32 runs with TF32 off, so float32 means float32 on CUDA too.
    """
    import torch

    check_precision(precision, device)
    with tf32(precision == "tf32"):
        if precision in ("fp32", "tf32"):
            yield
            return
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
