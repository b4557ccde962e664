"""Cache CNN codes + linear head vs fine-tuning vs the tutorial's fixed extractor, side by side.

    python bench/compare.py [--data DIR] [--arch A] [--weights W] [--epochs E] [--views K]
                            [--json out.json] [--plot out.png]

With no arguments it runs on the embedded digits dataset (no download). The reference run:
    python bench/compare.py --data ../shared/data/hymenoptera_data --arch resnet50 \\
        --weights ../shared/weights/resnet50-imagenet-keras.pth

Paths, all on the same data and machine, in this one run:
  cache     `cnncodes.extract` (train + val, plus --views) then `fit_head` for svm, logreg, linear
  finetune  `cnncodes.finetune` end to end (the reference recipe: SGD 1e-3, momentum 0.9, StepLR 7/0.1)
  fixed     the PyTorch tutorial's "fixed feature extractor" as peers run it: frozen backbone left in
            train mode, new fc trained with the same optimizer and schedule, batch 4, fp32, the whole
            forward pass recomputed every epoch
Accuracy is always the final model's on val (no best-epoch picking). A path run for fewer
epochs than asked (--measure-epochs) has its time extrapolated, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402
from extract_speed import ceiling  # noqa: E402

from cnncodes.backbones import create_model, default_preprocessing, resolve_weights  # noqa: E402
from cnncodes.data import Preprocessing, discover  # noqa: E402
from cnncodes.errors import CnnCodesError  # noqa: E402
from cnncodes.extract import extract  # noqa: E402
from cnncodes.finetune import finetune  # noqa: E402
from cnncodes.heads import fit_head  # noqa: E402
from cnncodes.runtime import configure_threads, resolve_device  # noqa: E402

HEADS = ("svm", "logreg", "linear")


def cache_path(args, data: Path, work: Path) -> list[dict]:
    """Extract once, then fit each head: one row per head."""
    start = time.perf_counter()
    r = extract(data, work / "codes.h5", arch=args.arch, weights=args.weights, image_size=args.image_size,
                views=args.views, eval_views=args.eval_views, precision=args.precision, batch_size=64,
                device=args.device, overwrite=True, progress=False, log=lambda m: None)
    extract_s = time.perf_counter() - start
    rows = []
    for clf in HEADS:
        start = time.perf_counter()
        _, report = fit_head(work / "codes.h5", clf=clf, tta=args.eval_views > 0, device=args.device)
        fit_s = time.perf_counter() - start
        rows.append({
            "path": f"cache+{clf}", "extract_s": extract_s, "fit_s": fit_s, "train_s": 0.0, "eval_s": 0.0,
            "images_per_s": r.images_per_s, "time_to_model_s": extract_s + fit_s,
            "val_acc": report["splits"]["val"]["accuracy"], "C": report["C"],
            "epochs_run": None, "extrapolated": False,
            "note": f"{r.extracted} images, {r.codes} codes (views {args.views}, eval views {args.eval_views}); "
                    f"val extraction included in extract",
        })
    return rows


def finetune_path(args, data: Path, work: Path) -> dict:
    start = time.perf_counter()
    res = finetune(data, work / "ft", arch=args.arch, weights=args.weights, epochs=args.measure_epochs,
                   batch_size=args.batch_size, image_size=args.image_size, precision=args.precision,
                   device=args.device, seed=0, overwrite=True, progress=False, echo=lambda m: None)
    wall = time.perf_counter() - start
    train_s = sum(h["train_time_s"] for h in res.history)
    eval_s = sum(h["epoch_time_s"] - h["train_time_s"] for h in res.history)
    images = sum(h["train_images"] for h in res.history)
    return _epoch_row("finetune", args, args.measure_epochs, wall, train_s, eval_s, images, res.final["val_acc"])


def _epoch_row(name: str, args, m: int, wall: float, train_s: float, eval_s: float, images: int, val_acc: float) -> dict:
    """Scale a run of `m` epochs to `epochs`: setup once, train and eval per epoch."""
    e = args.epochs
    setup = max(0.0, wall - train_s - eval_s)
    scale = e / m
    return {
        "path": name, "extract_s": 0.0, "fit_s": 0.0, "train_s": train_s * scale, "eval_s": eval_s * scale,
        "images_per_s": images / train_s if train_s else 0.0, "time_to_model_s": setup + train_s * scale,
        "val_acc": val_acc, "epochs_run": m, "extrapolated": m < e,
        "note": (f"ran {m} of {e} epochs: times extrapolated x{scale:g}, accuracy after epoch {m}" if m < e
                 else f"{e} epochs"),
    }


def fixed_extractor_path(args, data: Path) -> dict:
    """The tutorial's fixed extractor, as written there (BN left in train mode, batch 4, fp32)."""
    info = resolve_weights(args.arch, args.weights)
    pre = default_preprocessing(args.arch, info)
    if args.image_size:
        pre = Preprocessing.for_image_size(args.image_size, pre)
    norm = transforms.Normalize(pre.mean, pre.std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(pre.crop), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(pre.resize), transforms.CenterCrop(pre.crop), transforms.ToTensor(), norm])
    sets = {s: torchvision.datasets.ImageFolder(data / s, tf) for s, tf in (("train", train_tf), ("val", val_tf))}
    loaders = {s: torch.utils.data.DataLoader(d, batch_size=4, shuffle=s == "train", num_workers=4) for s, d in sets.items()}
    start = time.perf_counter()
    model, _ = create_model(args.arch, args.weights)
    for p in model.parameters():
        p.requires_grad = False
    model.fc = torch.nn.Linear(model.fc.in_features, len(sets["train"].classes))
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_s = eval_s = 0.0
    images = 0
    acc = 0.0
    for _ in range(args.fixed_measure_epochs):
        t = time.perf_counter()
        model.train()  # as in the tutorial: frozen BatchNorm still updates its running statistics
        for x, y in loaders["train"]:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            images += len(x)
        sched.step()
        train_s += time.perf_counter() - t
        t = time.perf_counter()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in loaders["val"]:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        acc = correct / total
        eval_s += time.perf_counter() - t
    wall = time.perf_counter() - start
    return _epoch_row("fixed (tutorial)", args, args.fixed_measure_epochs, wall, train_s, eval_s, images, acc)


def print_table(rows: list[dict], ceiling_ips: float, args) -> None:
    print(f"\n{'path':17} {'extract':>8} {'fit':>6} {'train':>8} {'eval':>7} {'img/s':>7} {'to model':>9} "
          f"{'val acc':>7} {'vs finetune':>11} {'vs fixed':>9}")
    ft = next(r for r in rows if r["path"] == "finetune")
    fx = next(r for r in rows if r["path"].startswith("fixed"))
    for r in rows:
        vs_ft = ft["time_to_model_s"] / r["time_to_model_s"]
        vs_fx = fx["time_to_model_s"] / r["time_to_model_s"]
        r["speedup_vs_finetune"], r["speedup_vs_fixed"] = vs_ft, vs_fx
        print(f"{r['path']:17} {r['extract_s']:8.1f} {r['fit_s']:6.1f} {r['train_s']:8.1f} {r['eval_s']:7.1f} "
              f"{r['images_per_s']:7.1f} {r['time_to_model_s']:8.1f}s {100 * r['val_acc']:6.2f}% "
              f"{vs_ft:10.1f}x {vs_fx:8.1f}x")
    print("times in seconds; 'to model' = wall time to a trained model (cache: extract train+val + fit; "
          "others: setup + training epochs, per-epoch val excluded); speed-ups = other path's time / this path's")
    for r in rows:
        print(f"  {r['path']}: {r['note']}")
    print(f"model-only forward ceiling ({args.arch}, {args.precision}, batch 64, channels_last): {ceiling_ips:.1f} img/s")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["time_to_model_s"], 100 * r["val_acc"], s=60)
        ax.annotate(r["path"] + (" (extrap.)" if r["extrapolated"] else ""), (r["time_to_model_s"], 100 * r["val_acc"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("wall time to a trained model (s, log scale)")
    ax.set_ylabel("final val accuracy (%)")
    ax.set_title("cached CNN codes vs fine-tuning vs fixed extractor")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="image folder with train/ and val/ (default: embedded digits)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--weights", default="DEFAULT", help="torchvision name, state_dict file, or none (DEFAULT falls back to none offline)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--measure-epochs", type=int, default=None,
                   help="fine-tuning epochs actually run (default: --epochs); time is extrapolated")
    p.add_argument("--fixed-measure-epochs", type=int, default=None,
                   help="tutorial fixed-extractor epochs actually run (default: --measure-epochs)")
    p.add_argument("--views", type=int, default=0)
    p.add_argument("--eval-views", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--precision", default="bf16" if not torch.cuda.is_available() else "fp16",
                   help="for the cache and finetune paths (the tutorial path runs fp32, as written)")
    p.add_argument("--batch-size", type=int, default=32, help="finetune batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    args.measure_epochs = min(args.measure_epochs or args.epochs, args.epochs)
    args.fixed_measure_epochs = min(args.fixed_measure_epochs or args.measure_epochs, args.epochs)
    return args


def main() -> None:
    args = parse_args()
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
    configure_threads(device)
    layout = discover(args.data)
    counts = {s: len(f) for s, f in layout.splits.items()}
    print(f"data: {args.data} {counts}; arch {args.arch}; weights {args.weights}; epochs {args.epochs}; "
          f"precision {args.precision}\nhardware: {hardware()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += cache_path(args, args.data, work)
        print("cache path done", flush=True)
        rows.append(finetune_path(args, args.data, work))
        print("finetune path done", flush=True)
        rows.append(fixed_extractor_path(args, args.data))
        configure_threads(device)  # the tutorial's DataLoader workers may have changed it
    ceiling_ips = ceiling(args.arch, args.precision, 64, 256, device)
    print_table(rows, ceiling_ips, args)
    result = {"data": str(args.data), "splits": counts, "arch": args.arch, "weights": args.weights,
              "epochs": args.epochs, "measure_epochs": args.measure_epochs, "fixed_measure_epochs": args.fixed_measure_epochs, "views": args.views,
              "eval_views": args.eval_views, "precision": args.precision, "hardware": hardware(),
              "ceiling_images_per_s": ceiling_ips, "date": time.strftime("%Y-%m-%d"), "paths": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
