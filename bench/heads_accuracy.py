"""Heads on real codes: hymenoptera (ants vs bees), ResNet50 ImageNet weights, val accuracy and fit time.

Extracts with the package's own `extract` API into --cache-dir (reruns are incremental: an
up-to-date cache is not recomputed), then fits every head on three set-ups:

  plain       the centre-crop code of each train image only (no views)
  views       the centre crop + K augmented views per train image; val scored on its centre crop
  views+tta   same head, val scores averaged over the centre crop + K stored eval views

C is chosen by grouped 5-fold CV on train for every fit, and the "chosen by CV" line picks
the set-up with the best CV accuracy per head: no choice looks at val. The bf16 check extracts
the plain codes in fp32 and bf16 and compares codes and accuracies.

    python bench/heads_accuracy.py                      # from the repo root
    python bench/heads_accuracy.py --views 10 --eval-views 10 --precision bf16

Measured (2 shared CPU cores, load ~1, 245 train / 153 val images, views10 = 2695 train codes):
bf16 codes differ from fp32 by 1.2% (relative L2) with the same C, CV and val accuracy
(0.9542 logreg), and extract views 2x faster (244 s vs 499 s for 4378 codes). Val accuracy
(images): plain logreg 0.9542 (146/153), svm 0.9477, linear 0.9412, linear-svm 0.9477;
views and views+tta 0.9346-0.9412 for every head, although CV on train prefers views+tta
(0.9755 vs 0.9673): the 96% target is not reached; the standard error on 153 images is 1.8%.
Fit time per head (5-fold CV of 7 C values + final fit): 0.1-0.2 s (plain), 0.4-4.3 s (views).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"
WEIGHTS = ROOT.parent / "shared" / "weights" / "resnet50-imagenet-keras.pth"


def extract_cache(args, name: str, precision: str, views: int, eval_views: int) -> Path:
    """Extract (or find up to date) one cache; prints what it did."""
    from cnncodes.extract import extract

    out = Path(args.cache_dir) / f"{name}-{precision}.h5"
    r = extract(args.data, out, arch=args.arch, weights=str(args.weights), views=views, eval_views=eval_views,
                precision=precision, progress=False, log=lambda m: None)
    what = "up to date" if r.up_to_date else f"extracted {r.extracted} images ({r.codes} codes) in {r.seconds:.0f} s " \
                                              f"({r.codes / max(r.seconds, 1e-9):.1f} codes/s)"
    print(f"# {out.name}: {what}; {r.split_counts}", flush=True)
    return out


def fit(cache: Path, clf: str, tta: bool) -> dict:
    from cnncodes.heads import fit_head

    start = time.perf_counter()
    head, report = fit_head(cache, clf, "auto", tta=tta, device="cpu")
    return {"C": head.C, "cv": report["selection"]["cv_score"], "val": report["splits"]["val"]["accuracy"],
            "correct": report["splits"]["val"]["correct"], "images": report["splits"]["val"]["images"],
            "seconds": time.perf_counter() - start}


def precision_check(args) -> None:
    """bf16 vs fp32 plain codes: code difference and logreg accuracy (C by CV)."""
    from cnncodes.store import Cache

    fp32, bf16 = (extract_cache(args, "plain", p, 0, 0) for p in ("fp32", "bf16"))
    with Cache(fp32) as a, Cache(bf16) as b:
        x, z = a.features("val")[()], b.features("val")[()]
    rel = np.linalg.norm(x - z, axis=1) / np.linalg.norm(x, axis=1)
    r32, r16 = fit(fp32, "logreg", False), fit(bf16, "logreg", False)
    print(f"# precision check: bf16 codes differ from fp32 by {rel.mean():.2%} (relative L2, mean; max {rel.max():.2%}); "
          f"logreg val {r32['val']:.4f} (fp32, C={r32['C']:g}) vs {r16['val']:.4f} (bf16, C={r16['C']:g}); "
          f"CV {r32['cv']:.4f} vs {r16['cv']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--cache-dir", default="/tmp/cnncodes-bench")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--eval-views", type=int, default=10)
    ap.add_argument("--precision", default="bf16", help="precision of the views cache (bf16: ~2x faster on CPUs with AVX512-BF16)")
    ap.add_argument("--clfs", default="logreg,svm,linear,linear-svm")
    ap.add_argument("--no-precision-check", action="store_true")
    args = ap.parse_args()
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    if not args.no_precision_check:
        precision_check(args)
    plain = extract_cache(args, "plain", args.precision, 0, 0)
    views = extract_cache(args, f"views{args.views}-eval{args.eval_views}", args.precision, args.views, args.eval_views)
    setups = {"plain": (plain, False), "views": (views, False), "views+tta": (views, True)}
    print(f"{'set-up':<11} {'head':<11} {'C':>7} {'CV acc':>7} {'val acc':>8} {'val':>8} {'fit s':>6}")
    for clf in args.clfs.split(","):
        results = {}
        for name, (cache, tta) in setups.items():
            r = results[name] = fit(cache, clf, tta)
            print(f"{name:<11} {clf:<11} {r['C']:>7.0e} {r['cv']:>7.4f} {r['val']:>8.4f} {r['correct']:>4}/{r['images']:<3} "
                  f"{r['seconds']:>6.1f}", flush=True)
        best = max(results, key=lambda k: results[k]["cv"])  # first best wins: plain before views
        r = results[best]
        print(f"{'  chosen by CV: ' + best:<23} {r['C']:>7.0e} {r['cv']:>7.4f} {r['val']:>8.4f} {r['correct']:>4}/{r['images']:<3}")


if __name__ == "__main__":
    main()
