"""Helpers shared by the bench scripts: data location, machine description, timing, model-only
ceilings and results files.

A bench that writes `bench/results/<name>.json` through `write_results` gets the machine, load
average, versions, date, git commit and exact command recorded the same way as every other;
`bench/report.py` turns such files into the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
RESNET50_KERAS = SHARED / "weights" / "resnet50-imagenet-keras.pth"


def default_data() -> Path:
    """The ants/bees set when `../shared` is there, else the embedded digits written to /tmp."""
    if HYMENOPTERA.is_dir():
        return HYMENOPTERA
    from cnncodes.demo import write_digits

    return write_digits(Path(tempfile.gettempdir()) / "cnncodes-bench-digits")


# --------------------------------------------------------------------------- the machine


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_bf16() -> str:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) or emulates it (~7x slower than fp32):
    CPUs of one model name differ here, so every figure says which it had."""
    flags = _cpuinfo("flags")
    if flags is None:
        return "unknown"
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    return f"native ({', '.join(native)})" if native else "emulated (no avx512_bf16/amx_bf16)"


def hardware() -> str:
    """One line: CPU, cores, torch and its threads, GPU."""
    from cnncodes.runtime import available_cores

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}; {available_cores()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); {gpu}"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (what else ran on the machine), rounded."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def machine() -> dict:
    """What a figure was measured on: CPU, cores, memory, GPU and software versions."""
    import torchvision

    from cnncodes.runtime import available_cores

    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        mem_gib = None
    return {
        "cpu": cpu_model(), "cpu_bf16": cpu_bf16(), "cores": available_cores(), "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
    }


def git_commit() -> str | None:
    """The checkout's commit, with '+dirty' when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def command_line() -> str:
    """The exact command that ran this bench, shell-quoted, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def results_header(bench: str) -> dict:
    """The fields every results file starts with; call before the bench runs (load before)."""
    return {"bench": bench, "schema": 1, "command": command_line(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": git_commit(), "machine": machine(), "load_before": load_average()}


def write_results(result: dict, path: Path, printout: list[str] | None = None, stamp_load: bool = True) -> None:
    """Add the load average after the run and write `result` as JSON (atomically); with `printout`,
    the lines the bench printed go beside it as PATH.txt. `stamp_load=False`: a results file written
    again after its run (a table derived anew, a figure added) keeps the load its measurement left."""
    if stamp_load:
        result["load_after"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    if printout is not None:
        path.with_suffix(".txt").write_text("\n".join(printout) + "\n")


# --------------------------------------------------------------------------- timing


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call, with CUDA synchronised."""
    _sync()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync()
    return time.perf_counter() - start, out


def synthetic_batch(batch: int, crop: int, device: torch.device, channels_last: bool,
                    classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised-looking float batch and labels already on the device."""
    x = torch.randn(batch, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), device=device)


def _rate(step: Callable[[], None], batch: int, images: int) -> float:
    """Images/s of `step` repeated over about `images` images (at least 2 steps), after a warm-up."""
    steps = max(2, math.ceil(images / batch))
    step()  # warm-up: oneDNN/cuDNN pick their kernels
    seconds, _ = timed(lambda: [step() for _ in range(steps)])
    return steps * batch / seconds


def forward_ceiling(model: nn.Module, batch: int, crop: int, precision: str, channels_last: bool,
                    device: torch.device, images: int) -> float:
    """Images/s of `model` alone, forward without gradients, in the mode it is in (eval or train)."""
    from cnncodes.runtime import autocast

    x, _ = synthetic_batch(batch, crop, device, channels_last)

    @torch.no_grad()
    def step() -> None:
        with autocast(device, precision):
            model(x)

    return _rate(step, batch, images)


def train_ceiling(model: nn.Module, params: Iterable[nn.Parameter], batch: int, crop: int, precision: str,
                  channels_last: bool, device: torch.device, images: int, classes: int = 2) -> float:
    """Images/s of one SGD training step alone (forward, cross-entropy, backward, update of `params`)."""
    from cnncodes.runtime import autocast

    x, y = synthetic_batch(batch, crop, device, channels_last, classes)
    opt = torch.optim.SGD(list(params), lr=1e-3, momentum=0.9)

    def step() -> None:
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _rate(step, batch, images)
