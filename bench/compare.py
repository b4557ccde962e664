"""Cache CNN codes + linear head vs fine-tuning vs the tutorial's fixed extractor, measured honestly.

    python bench/compare.py [--data DIR] [--arch A] [--weights W] [--precision P] [--epochs E]
                            [--repeats R] [--measure-epochs M | --full] [--json FILE] [--plot PNG]

With no --data it runs on the embedded digits dataset (no download). The reference run:
    python bench/compare.py --data ../shared/data/hymenoptera_data --arch resnet50 \\
        --weights ../shared/weights/resnet50-imagenet-keras.pth --precision bf16 --full --lpft

Paths (PATHS), all on the same data and machine, in this one process:
  cache     `cnncodes.extract` (train + val) then `fit_head` for svm, logreg, linear
  finetune  `cnncodes.finetune.finetune`, the tutorial's recipe (SGD 1e-3, momentum 0.9, StepLR 7/0.1,
            batch 4, a val pass every epoch); the final-epoch model is the one reported
  lpft      (with --lpft) LP-FT: the finetune path's recipe started from the cache path's logreg head
            (`finetune --init-head`); its time includes the cache path's extract + logreg fit time,
            and its row also stores the epoch-0 val accuracy (the head's, before any step)
  fixed     the PyTorch tutorial's "fixed feature extractor" loop as written there (torchvision
            ImageFolder + PIL transforms, 4 DataLoader workers, frozen backbone left in train mode,
            new fc trained by the same recipe, the whole forward pass recomputed every epoch)
One --precision and one layout (channels_last unless --no-channels-last) hold for every path;
--fixed-as-written runs the tutorial loop in fp32 NCHW instead. Each path's precision, batch and
layout are printed and stored, with every difference from the tutorial's recipe.

How it is measured:
  * Each path runs --repeats times (median), or, with --full, the epoch paths run all --epochs
    once. Without --full they run --measure-epochs epochs and their time is EXTRAPOLATED:
    wall time of the epochs run + the missing epochs at the median measured epoch time
    (train + val pass); such a run has no final accuracy, only the accuracy after the epochs
    run, stored apart. Accuracies are always the last epoch's on val, never the best epoch.
  * The model-only ceiling (the same model, precision, batch and layout on a synthetic batch
    already in memory: forward without gradients for extraction and val passes, a full SGD step
    for training) is measured just before and after each run of each path, so it sees the
    same machine load as the path; the median is used.
  * Work: the cache path runs one forward per code; an epoch path one training step per train
    image and one forward per val image, each epoch. Model-only time = work / ceilings.
  * Bound: a speed-up cannot exceed (other path's model-only time) / (cache path's model-only
    time) when both paths run at the same fraction of their ceilings. Each speed-up is printed
    beside its bound and ratio / bound; a ratio above its bound means the other path lost time
    outside the network (or the load changed), not that caching is faster than its work.
Results go to bench/results/compare.json (machine, load average before/after, versions, date,
git commit, exact command); `python bench/report.py` turns that file into docs/benchmarks.md's table.

The paths themselves (and how to add one) are in bench/compare_paths.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_average, results_header, write_results  # noqa: E402
from compare_paths import (  # noqa: E402  (re-exported: the bench's path classes live there)
    PATHS,
    TUTORIAL,
    BenchPath,
    CachePath,
    Context,
    EpochPath,
    FinetunePath,
    LPFTPath,
    Outcome,
    Settings,
    TutorialFixedPath,
    Work,
    selected_paths,
)
from report import render  # noqa: E402

from cnncodes.backbones import create_model, resolve_preprocessing, resolve_weights  # noqa: E402
from cnncodes.data import discover  # noqa: E402
from cnncodes.errors import CnnCodesError  # noqa: E402
from cnncodes.precision import native_bf16  # noqa: E402
from cnncodes.runtime import configure_threads, inference_batch_size, resolve_device  # noqa: E402

__all__ = ["PATHS", "BenchPath", "CachePath", "Context", "EpochPath", "FinetunePath", "LPFTPath", "Outcome",
           "Settings", "TutorialFixedPath", "Work", "main", "measure", "ratios"]

# --------------------------------------------------------------------------- measuring


def measure(path: BenchPath, ctx: Context) -> list[dict]:
    """Run `path` its repeats, each between two ceiling measurements; one row dict per row name."""
    load_before = load_average()
    configure_threads(ctx.device)
    ceilings = [path.ceilings(ctx)]
    runs: list[dict[str, Outcome]] = []
    for i in range(path.repeats(ctx)):
        runs.append(path.run_once(ctx, ctx.work / f"{path.name}-{i}".replace(" ", "_")))
        configure_threads(ctx.device)  # the tutorial's DataLoader workers must not leave it changed
        ceilings.append(path.ceilings(ctx))
        print(f"  {path.name} run {i + 1}: " + ", ".join(f"{k} {o.seconds:.1f} s" for k, o in runs[-1].items()),
              flush=True)
    median_ceilings = {k: statistics.median(c[k] for c in ceilings) for k in ceilings[0]}
    rows = []
    for name in runs[0]:
        outs = [r[name] for r in runs]
        last = outs[-1]
        seconds = statistics.median(o.seconds for o in outs)
        model_only = last.work.model_only_s(median_ceilings)
        rows.append({
            "path": name, "kind": path.kind, "settings": asdict(path.settings(ctx)),
            "settings_label": path.settings(ctx).label(), "differs_from_tutorial": path.differs(ctx),
            "repeats": len(outs), "seconds": seconds, "seconds_each": [o.seconds for o in outs],
            "measured_s_each": [o.measured_s for o in outs], "extrapolated": last.extrapolated,
            "epochs_run": last.epochs_run, "epochs": ctx.args.epochs if last.epochs_run is not None else None,
            "parts": {k: statistics.median(o.parts[k] for o in outs) for k in last.parts},
            "val_acc": last.val_acc, "val_acc_each": [o.val_acc for o in outs], "partial": last.partial,
            "work": asdict(last.work), "ceilings_each": ceilings, "ceilings": median_ceilings,
            "model_only_s": model_only, "ceiling_share": model_only / seconds if seconds else None,
            "load_before": load_before, "load_after": load_average(), **last.extra,
        })
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each cache row's speed-up over each epoch path, beside the bound from model-only times."""
    out = []
    for c in (r for r in rows if r["kind"] == "cache"):
        for p in (r for r in rows if r["kind"] != "cache"):
            ratio, bound = p["seconds"] / c["seconds"], p["model_only_s"] / c["model_only_s"]
            out.append({"cache": c["path"], "other": p["path"], "ratio": ratio, "bound": bound,
                        "ratio_over_bound": ratio / bound, "extrapolated": p["extrapolated"]})
    return out


def nominal_bound(rows: list[dict]) -> dict[str, float]:
    """The bound if a backward cost two forwards at the same per-image speed everywhere."""
    cache = next(r for r in rows if r["kind"] == "cache")["work"]["forward"]
    return {r["path"]: (3 * r["work"]["train"] + r["work"]["forward"]) / cache for r in rows if r["kind"] != "cache"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        acc = r["val_acc"] if r["val_acc"] is not None else (r["partial"] or {}).get("val_acc")
        if acc is None:
            continue
        ax.scatter(r["seconds"], 100 * acc, s=60, marker="o" if r["val_acc"] is not None else "x")
        label = r["path"] + (" (time extrapolated; accuracy after "
                             f"{r['epochs_run']} of {r['epochs']} epochs)" if r["extrapolated"] else "")
        ax.annotate(label, (r["seconds"], 100 * acc), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time to a trained model (s, log scale)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("cached CNN codes vs fine-tuning vs fixed extractor")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="image folder with train/ and val/ (default: embedded digits)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--weights", default="DEFAULT", help="torchvision name, state_dict file, or none (DEFAULT falls back to none offline)")
    p.add_argument("--epochs", type=int, default=TUTORIAL["epochs"], help="the recipe's epochs")
    p.add_argument("--full", action="store_true",
                   help="run the epoch paths once for all --epochs (final accuracies, nothing extrapolated)")
    p.add_argument("--measure-epochs", type=int, default=1,
                   help="without --full: epochs the epoch paths run; their time is extrapolated to --epochs")
    p.add_argument("--repeats", type=int, default=3, help="runs of each path (median); with --full, of the cache path")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--preprocess-like", default=None, metavar="WEIGHTS",
                   help="with a weights file: these named weights' preprocessing (e.g. IMAGENET1K_V1), every path")
    p.add_argument("--precision", default=None,
                   help="every path's precision (the tutorial loop too, unless --fixed-as-written) [default: fp16 on "
                        "CUDA, bf16 on a CPU with bf16 instructions, else fp32]")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="NCHW on every path (default: channels_last)")
    p.add_argument("--batch-size", type=int, default=TUTORIAL["batch"], help="fine-tuning batch (tutorial: 4)")
    p.add_argument("--extract-batch", type=int, default=None, help="extraction batch (default: extract's own)")
    p.add_argument("--lpft", action="store_true",
                   help="also run LP-FT: finetune started from the cache path's logreg head (time includes it)")
    p.add_argument("--fixed-as-written", action="store_true", help="the tutorial loop in fp32 NCHW, as written")
    p.add_argument("--ceiling-images", type=int, default=48, help="images per model-only ceiling measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=RESULTS / "compare.json")
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.measure_epochs < 1 or args.epochs < 1:
        p.error("--repeats, --measure-epochs and --epochs must be >= 1")
    return args


def context(args: argparse.Namespace, work: Path) -> Context:
    if args.data is None:
        from cnncodes.demo import write_digits

        args.data = write_digits(Path(tempfile.gettempdir()) / "cnncodes-digits")
        args.image_size = args.image_size or 64
    try:
        create_model(args.arch, args.weights)
    except CnnCodesError as e:
        print(f"note: {e}\nnote: using --weights none (random weights)")
        args.weights = "none"
    device = resolve_device(args.device)
    if args.precision is None:  # the fastest precision that is native here; emulated bf16 is slower than fp32
        args.precision = "fp16" if device.type == "cuda" else "bf16" if native_bf16() else "fp32"
    args.extract_batch = args.extract_batch or inference_batch_size(device)
    layout = discover(args.data)
    prep = resolve_preprocessing(args.arch, resolve_weights(args.arch, args.weights), args.image_size,
                                 args.preprocess_like)
    return Context(args, device, prep, len(layout.classes), {s: len(f) for s, f in layout.splits.items()}, work)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = results_header("compare")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = context(args, Path(tmp))
        configure_threads(ctx.device)
        print(f"data: {args.data} {ctx.counts}; arch {args.arch}; weights {args.weights}; recipe {args.epochs} epochs; "
              f"{'full run' if args.full else f'{ctx.epochs_to_run} epoch(s) run, extrapolated'}; "
              f"load average {result['load_before']}", flush=True)
        rows = []
        for path in selected_paths(args):
            rows += measure(path, ctx)
    result.update({
        "data": str(args.data), "splits": ctx.counts, "arch": args.arch, "weights": args.weights,
        "image_size": ctx.prep.crop, "preprocessing": ctx.prep.to_dict(), "device": str(ctx.device), "epochs": args.epochs, "full": args.full,
        "epochs_run": ctx.epochs_to_run, "repeats": args.repeats, "precision": args.precision,
        "channels_last": args.channels_last, "paths": rows, "ratios": ratios(rows),
        "nominal_bound": nominal_bound(rows),
    })
    write_results(result, args.json)
    print(render(result, args.json.stem))
    print(f"results: {args.json}")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
