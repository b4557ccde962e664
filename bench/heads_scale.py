"""fit-head at scale: fit time and peak memory on synthetic caches (100k / 1M codes of dim 512, 100k of dim 2048).

Each fit runs in a fresh subprocess, after a warm-up fit on a 2k-code cache, so its peak RSS
(VmHWM, reset after the warm-up) is its own; "grew" is that peak minus the RSS before the fit, with MALLOC_MMAP_THRESHOLD_=1 MiB so that glibc hands freed blocks
back (the peak is live memory; --glibc-default measures what the allocator keeps too). "load" is the 1-minute load average when the fit ended: on a
shared machine, fit times above one load per core are inflated. Caches are written in the cache format (`write_synthetic_cache`:
10 Gaussian classes, 4 codes per source image) under --dir and deleted afterwards.

    python bench/heads_scale.py                       # all sizes, all heads that fit the size
    python bench/heads_scale.py --sizes 100000x2048 --clfs logreg,linear

Measured (2 shared CPU cores, 23 GB RAM; C by a held-out tenth; fit s / MB the fit grew):
  100k x 512  (0.22 GB): logreg 5.2 s / 390, linear 3.7 s / 227 (loaded: < 512 MB), linear-svm 2.9 s / 225,
                         svm 71 s / 2516 (load 2.8)
  1M x 512    (2.14 GB): linear 62 s / 75, linear-svm 49 s / 71 (streamed; svm/logreg skipped)
  100k x 2048 (0.85 GB): logreg 22.8 s / 1511, linear 32 s / 51, linear-svm 33 s / 50 (streamed),
                         svm 433 s / 9431 (load 3: liblinear holds 16 B per value per job)
  One exact LinearSVC fit alone, 90k x 2048, 10 classes, C=1e-3, one core, idle machine: 62 s with
  dual coordinate descent, 74 s with the primal solver; one-vs-rest over 2 threads saves only
  1.3x (each binary problem converts the codes to liblinear's sparse rows again). Choosing C
  takes 7 such fits plus the final one, so `svm` cannot meet 60 s at this size on 2 cores;
  `linear-svm` (a multiclass hinge loss on streamed minibatches) does, in 33 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIT = r"""
import json, sys, time
from cnncodes import heads
from cnncodes.store import Cache  # noqa: F401  (imported before the baseline, as fit_head would)

def status_mb(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

if sys.argv[4]:  # warm-up on a small cache: lazy imports, thread pools, BLAS buffers are not the fit's
    heads.fit_head(sys.argv[4], sys.argv[2], "auto", device=sys.argv[3])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status_mb("VmRSS")
start = time.perf_counter()
head, report = heads.fit_head(sys.argv[1], sys.argv[2], "auto", device=sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": status_mb("VmHWM"), "base_mb": base,
                  "C": head.C, "strategy": report["selection"]["strategy"], "cv": report["selection"]["cv_score"],
                  "val": report["splits"]["val"]["accuracy"]}))
"""

IN_MEMORY_CLFS = ("svm", "logreg")


def fit(cache: Path, clf: str, device: str, live: bool, warmup: Path | None) -> dict:
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if live else {})}
    proc = subprocess.run([sys.executable, "-c", FIT, str(cache), clf, device, str(warmup or "")], check=False,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000x512,1000000x512,100000x2048", help="codes x dim, comma-separated")
    ap.add_argument("--clfs", default="svm,logreg,linear,linear-svm")
    ap.add_argument("--in-memory-max", type=int, default=200_000, help="skip svm/logreg above this many codes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic caches go (deleted after)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's dynamic mmap threshold: freed blocks stay in the heap, so the peak counts them too")
    args = ap.parse_args()
    from cnncodes.testing import write_synthetic_cache

    print(f"{'codes':>9} {'dim':>5} {'GB':>5} {'clf':>10} {'fit s':>7} {'peak MB':>8} {'grew MB':>8} "
          f"{'C':>7} {'cv acc':>7} {'val acc':>7} {'load':>5}  C chosen by")
    for size in args.sizes.split(","):
        n, dim = (int(v) for v in size.split("x"))
        path = Path(args.dir) / f"cnncodes-synthetic-{n}x{dim}.h5"
        start = time.perf_counter()
        write_synthetic_cache(path, {"train": n // 4, "val": 2000}, dim=dim, n_classes=10, views=3, separation=3.0)
        gb = path.stat().st_size / 1e9
        warmup = write_synthetic_cache(Path(args.dir) / f"cnncodes-warmup-{dim}.h5", {"train": 500, "val": 50}, dim=dim,
                                       n_classes=10, views=3, separation=3.0)
        print(f"# wrote {path} ({gb:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
        try:
            for clf in args.clfs.split(","):
                if clf in IN_MEMORY_CLFS and n > args.in_memory_max:
                    print(f"{n:>9} {dim:>5} {gb:>5.2f} {clf:>10}  skipped: holds the codes in memory; use linear/linear-svm")
                    continue
                r = fit(path, clf, args.device, not args.glibc_default, warmup)
                if "error" in r:
                    print(f"{n:>9} {dim:>5} {gb:>5.2f} {clf:>10}  error: {r['error']}")
                    continue
                print(f"{n:>9} {dim:>5} {gb:>5.2f} {clf:>10} {r['seconds']:>7.1f} {r['peak_mb']:>8.0f} "
                      f"{r['peak_mb'] - r['base_mb']:>8.0f} {r['C']:>7.0e} {r['cv']:>7.4f} {r['val']:>7.4f} "
                      f"{os.getloadavg()[0]:>5.1f}  {r['strategy']}",
                      flush=True)
        finally:
            os.unlink(path)
            os.unlink(warmup)


if __name__ == "__main__":
    main()
