"""Helpers shared by the bench scripts: data location, hardware line, timing."""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
RESNET50_KERAS = SHARED / "weights" / "resnet50-imagenet-keras.pth"


def default_data() -> Path:
    """The ants/bees set when `../shared` is there, else the embedded digits written to /tmp."""
    if HYMENOPTERA.is_dir():
        return HYMENOPTERA
    from cnncodes.demo import write_digits

    return write_digits(Path(tempfile.gettempdir()) / "cnncodes-bench-digits")


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from cnncodes.data import available_cores

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {available_cores()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); {gpu}"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call, with CUDA synchronised."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out
