"""Extraction images/s with 1 and with N processes under torchrun, on the same data, in one run.

    python bench/extract_scale.py [--data DIR] [--arch resnet18] [--precision bf16] [--procs 2]

Each run is a real `cnncodes extract` process (or `torchrun --nproc_per_node N -m cnncodes
extract`) into a fresh cache; the figure is the extraction's own images/s line (network pass
of all ranks, start-up excluded) and the wall time of the whole command. On a 2-core CPU
machine two processes share the same two cores, so expect no speed-up; on a machine with
N GPUs each process drives one GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_data, hardware  # noqa: E402


def run(procs: int, data: Path, args, out: Path) -> tuple[float, float]:
    cmd = ["extract", str(data), "-o", str(out), "--arch", args.arch, "--weights", "none",
           "--precision", args.precision, "-q", "--overwrite"]
    if procs == 1:
        argv = [sys.executable, "-m", "cnncodes", *cmd]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                "-m", "cnncodes", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    ips = float(re.search(r"\(([\d.]+) img/s\)", proc.stdout).group(1))
    return ips, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    data = args.data or default_data()
    print(f"data: {data}; {args.arch} {args.precision}; {hardware()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, data, args, Path(tmp) / f"c{n}.h5") for n in (1, args.procs)}
    base = results[1][0]
    for n, (ips, wall) in results.items():
        print(f"{n} process{'es' if n > 1 else ''}: {ips:7.1f} img/s (network pass), {wall:6.1f} s wall for the command, "
              f"{ips / base:.2f}x the single process")


if __name__ == "__main__":
    main()
