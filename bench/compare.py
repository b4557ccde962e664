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
git commit, exact command); `python bench/report.py` turns that file into the README's table.

Adding a path: subclass `EpochPath` (or `BenchPath`), give it a name, `settings`, `ceilings` and
`run_once` (it can read the cache path's outputs from `ctx.outputs["cache"]`, as `LPFTPath`
does), and append an instance to PATHS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, forward_ceiling, load_average, results_header, train_ceiling, write_results  # noqa: E402
from report import render  # noqa: E402

from cnncodes.backbones import create_extractor, create_model, resolve_preprocessing, resolve_weights  # noqa: E402
from cnncodes.data import Preprocessing, discover  # noqa: E402
from cnncodes.precision import native_bf16  # noqa: E402
from cnncodes.errors import CnnCodesError  # noqa: E402
from cnncodes.extract import extract  # noqa: E402
from cnncodes.finetune import finetune  # noqa: E402
from cnncodes.finetune.config import INIT_HEAD_LR_MULT  # noqa: E402
from cnncodes.heads import fit_head  # noqa: E402
from cnncodes.runtime import autocast, configure_threads, inference_batch_size, resolve_device  # noqa: E402

HEADS = ("svm", "logreg", "linear")
# The PyTorch transfer-learning tutorial's recipe, which the epoch paths follow.
TUTORIAL = {"batch": 4, "workers": 4, "precision": "fp32", "channels_last": False, "lr": 1e-3, "momentum": 0.9,
            "lr_step": 7, "lr_gamma": 0.1, "epochs": 25}


# --------------------------------------------------------------------------- what a path did


@dataclass
class Settings:
    """How a path runs its network: the figures are comparable only where these agree."""

    precision: str
    batch: int
    channels_last: bool
    detail: str = ""

    def label(self) -> str:
        return f"{self.precision}, batch {self.batch}, {'channels_last' if self.channels_last else 'NCHW'}" + (
            f", {self.detail}" if self.detail else "")


@dataclass
class Work:
    """Images through the network for the whole recipe: forwards without gradients, training steps."""

    forward: float = 0.0
    train: float = 0.0

    def model_only_s(self, ceilings: dict[str, float]) -> float:
        """Seconds the network alone would need at the measured ceilings (images/s)."""
        return (self.forward / ceilings["forward"] if self.forward else 0.0) + (
            self.train / ceilings["train"] if self.train else 0.0)


@dataclass
class Outcome:
    """One run of one row of a path (the cache path gives one row per head)."""

    seconds: float  # wall time to a trained model for the whole recipe (extrapolated if so marked)
    measured_s: float  # wall time actually run
    work: Work
    parts: dict[str, float] = field(default_factory=dict)
    epochs_run: int | None = None
    extrapolated: bool = False
    val_acc: float | None = None  # final epoch of a full run only
    partial: dict | None = None  # accuracy after fewer epochs than the recipe's: not a final figure
    extra: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every path shares: the parsed options, the data, the device, the preprocessing."""

    args: argparse.Namespace
    device: torch.device
    prep: Preprocessing
    classes: int
    counts: dict[str, int]
    work: Path
    outputs: dict = field(default_factory=dict)  # a path's products for later paths (e.g. LP-FT)

    @property
    def epochs_to_run(self) -> int:
        return self.args.epochs if self.args.full else min(self.args.measure_epochs, self.args.epochs)


class BenchPath:
    """One way to get a trained model. Subclasses say how it runs and what its ceilings are."""

    name = "path"
    kind = "epochs"

    def settings(self, ctx: Context) -> Settings:
        raise NotImplementedError

    def differs(self, ctx: Context) -> list[str]:
        """How this run departs from the tutorial's recipe (empty: it is the recipe)."""
        return []

    def repeats(self, ctx: Context) -> int:
        return ctx.args.repeats

    def ceilings(self, ctx: Context) -> dict[str, float]:
        """Model-only images/s now: 'forward' (no gradients) and, for training paths, 'train'."""
        raise NotImplementedError

    def run_once(self, ctx: Context, out: Path) -> dict[str, Outcome]:
        """Run the path once; one Outcome per row name."""
        raise NotImplementedError


# --------------------------------------------------------------------------- the cache path


class CachePath(BenchPath):
    """Extract the codes of train + val once, then fit each head (C chosen by CV on train)."""

    name, kind = "cache", "cache"

    def settings(self, ctx: Context) -> Settings:
        return Settings(ctx.args.precision, ctx.args.extract_batch, ctx.args.channels_last,
                        "BatchNorm folded, eval mode, cnncodes loader")

    def differs(self, ctx: Context) -> list[str]:
        return ["no training epochs: one forward per image, then a linear head on the cached codes"]

    def ceilings(self, ctx: Context) -> dict[str, float]:
        if not hasattr(self, "_model"):
            model, _, _ = create_extractor(ctx.args.arch, "none")  # same speed as real weights
            self._model = model.to(ctx.device, memory_format=_layout(ctx.args.channels_last))
        s = self.settings(ctx)
        return {"forward": forward_ceiling(self._model, s.batch, ctx.prep.crop, s.precision, s.channels_last,
                                           ctx.device, ctx.args.ceiling_images)}

    def run_once(self, ctx: Context, out: Path) -> dict[str, Outcome]:
        a = ctx.args
        start = time.perf_counter()
        r = extract(a.data, out / "codes.h5", arch=a.arch, weights=a.weights, image_size=a.image_size,
                    preprocess_like=a.preprocess_like, precision=a.precision, batch_size=a.extract_batch, channels_last=a.channels_last,
                    device=a.device, overwrite=True, progress=False, log=lambda m: None)
        extract_s = time.perf_counter() - start
        rows, heads, seconds = {}, {}, {}
        for clf in HEADS:
            start = time.perf_counter()
            heads[clf], report = fit_head(out / "codes.h5", clf=clf, device=a.device)
            fit_s = time.perf_counter() - start
            seconds[clf] = extract_s + fit_s
            rows[f"cache+{clf}"] = Outcome(
                seconds=extract_s + fit_s, measured_s=extract_s + fit_s, work=Work(forward=r.codes),
                parts={"extract_s": extract_s, "fit_s": fit_s}, val_acc=report["splits"]["val"]["accuracy"],
                extra={"C": report["C"], "codes": r.codes})
        ctx.outputs["cache"] = {"codes": out / "codes.h5", "heads": heads, "seconds": seconds, "forward": r.codes}
        return rows


# --------------------------------------------------------------------------- epoch paths


class EpochPath(BenchPath):
    """A path that trains for the recipe's epochs with a val pass after each (the tutorial's shape)."""

    def run_epochs(self, ctx: Context, out: Path, epochs: int) -> tuple[float, list[dict]]:
        """Train `epochs` epochs; (wall seconds, one dict per epoch: train_images, val_images,
        epoch_time_s (train + val pass), val_acc)."""
        raise NotImplementedError

    def repeats(self, ctx: Context) -> int:
        """A full run trains all the recipe's epochs once (--repeats is the cache path's)."""
        return 1 if ctx.args.full else ctx.args.repeats

    def run_once(self, ctx: Context, out: Path) -> dict[str, Outcome]:
        m, e = ctx.epochs_to_run, ctx.args.epochs
        wall, history = self.run_epochs(ctx, out, m)
        per_epoch = statistics.median(h["epoch_time_s"] for h in history)
        train_images = statistics.median(h["train_images"] for h in history)
        val_images = statistics.median(h["val_images"] or 0 for h in history)
        final = m == e
        return {self.name: Outcome(
            seconds=wall + (e - m) * per_epoch, measured_s=wall, epochs_run=m, extrapolated=not final,
            work=Work(forward=e * val_images, train=e * train_images),
            parts={"epoch_s": per_epoch, "setup_and_saves_s": wall - sum(h["epoch_time_s"] for h in history)},
            val_acc=history[-1]["val_acc"] if final else None,
            partial=None if final else {"epoch": m, "of": e, "val_acc": history[-1]["val_acc"]},
            extra={"train_images": train_images, "val_images": val_images,
                   "val_acc_by_epoch": [h["val_acc"] for h in history]})}  # the curve, not only its end


def _epoch_ceilings(ctx: Context, s: Settings, model: torch.nn.Module, params) -> dict[str, float]:
    """An epoch path's model-only rates: a training step on `params` (train mode) and an eval forward."""
    a = ctx.args
    model.train()
    train = train_ceiling(model, params, s.batch, ctx.prep.crop, s.precision, s.channels_last, ctx.device,
                          a.ceiling_images, ctx.classes)
    model.eval()
    fwd = forward_ceiling(model, s.batch, ctx.prep.crop, s.precision, s.channels_last, ctx.device, a.ceiling_images)
    return {"forward": fwd, "train": train}


class FinetunePath(EpochPath):
    """`cnncodes.finetune.finetune` end to end, with the tutorial's recipe (the library's defaults)."""

    name = "finetune"

    def settings(self, ctx: Context) -> Settings:
        return Settings(ctx.args.precision, ctx.args.batch_size, ctx.args.channels_last,
                        "cnncodes loader, val batch = train batch")

    def differs(self, ctx: Context) -> list[str]:
        return _differs(self.settings(ctx), ["cnncodes loader (uint8 decode and resize on threads, no worker "
                                             "processes on small CPUs)",
                                             "final-epoch model reported (the tutorial keeps the best val epoch)"])

    def _models(self, ctx: Context):
        if not hasattr(self, "_model"):
            model, _ = create_model(ctx.args.arch, "none", num_classes=ctx.classes)
            self._model = model.to(ctx.device, memory_format=_layout(ctx.args.channels_last))
        return self._model

    def ceilings(self, ctx: Context) -> dict[str, float]:
        model = self._models(ctx)
        return _epoch_ceilings(ctx, self.settings(ctx), model, model.parameters())

    def run_epochs(self, ctx: Context, out: Path, epochs: int) -> tuple[float, list[dict]]:
        a = ctx.args
        start = time.perf_counter()
        res = finetune(a.data, out / "ft", arch=a.arch, weights=a.weights, epochs=epochs, batch_size=a.batch_size,
                       image_size=a.image_size, preprocess_like=a.preprocess_like, precision=a.precision,
                       channels_last=a.channels_last, device=a.device, seed=0, overwrite=True, progress=False, echo=lambda m: None)
        wall = time.perf_counter() - start
        return wall, [{k: h[k] for k in ("train_images", "val_images", "epoch_time_s", "val_acc")} for h in res.history]


class LPFTPath(FinetunePath):
    """LP-FT: the finetune path's recipe, its classifier started from the cache path's logreg head.

    Time to a trained model = the cache path's extract + logreg fit (its last run) + this run; the
    epoch-0 evaluation (the head's own val accuracy, before any step) counts in setup time.
    """

    name = "lpft"
    head = "logreg"

    def differs(self, ctx: Context) -> list[str]:
        return super().differs(ctx) + [(f"classifier started from the cache path's {self.head} head (LP-FT, "
                                        f"head lr x {INIT_HEAD_LR_MULT:g}); its extract + fit time is included")]

    def run_epochs(self, ctx: Context, out: Path, epochs: int) -> tuple[float, list[dict]]:
        a, cache = ctx.args, ctx.outputs.get("cache")
        if not cache:
            raise RuntimeError("the lpft path needs the cache path's head: keep it after the cache path in PATHS")
        out.mkdir(parents=True, exist_ok=True)
        head_path = out / f"{self.head}.h5"
        cache["heads"][self.head].save(head_path)
        start = time.perf_counter()
        res = finetune(a.data, out / "ft", arch=a.arch, weights=a.weights, epochs=epochs, batch_size=a.batch_size,
                       image_size=a.image_size, preprocess_like=a.preprocess_like, precision=a.precision,
                       channels_last=a.channels_last, device=a.device, seed=0, init_head=str(head_path), overwrite=True, progress=False,
                       echo=lambda m: None)
        wall = time.perf_counter() - start
        self._epoch0_val_acc = res.history[0]["val_acc"]  # epoch 0: the head as loaded, no step
        return wall, [{k: h[k] for k in ("train_images", "val_images", "epoch_time_s", "val_acc")}
                      for h in res.history if h["epoch"] >= 1]

    def run_once(self, ctx: Context, out: Path) -> dict[str, Outcome]:
        rows = super().run_once(ctx, out)
        o, cache = rows[self.name], ctx.outputs["cache"]
        head_s = cache["seconds"][self.head]
        o.seconds += head_s
        o.measured_s += head_s
        o.parts["cache_head_s"] = head_s
        o.work.forward += cache["forward"] + o.extra["val_images"]  # the codes, and the epoch-0 val pass
        o.extra["epoch0_val_acc"] = self._epoch0_val_acc
        return rows


class TutorialFixedPath(EpochPath):
    """The tutorial's fixed feature extractor loop, as written there (see the module docstring)."""

    name = "fixed (tutorial)"

    def settings(self, ctx: Context) -> Settings:
        a = ctx.args
        if a.fixed_as_written:
            return Settings(TUTORIAL["precision"], TUTORIAL["batch"], TUTORIAL["channels_last"], _TUTORIAL_LOADER)
        return Settings(a.precision, TUTORIAL["batch"], a.channels_last, _TUTORIAL_LOADER)

    def differs(self, ctx: Context) -> list[str]:
        return _differs(self.settings(ctx), ["final-epoch model reported (the tutorial keeps the best val epoch)"])

    def _build(self, ctx: Context, weights: str):
        s = self.settings(ctx)
        model, _ = create_model(ctx.args.arch, weights)
        model.requires_grad_(False)
        model.fc = torch.nn.Linear(model.fc.in_features, ctx.classes)
        return model.to(ctx.device, memory_format=_layout(s.channels_last))

    def ceilings(self, ctx: Context) -> dict[str, float]:
        if not hasattr(self, "_model"):
            self._model = self._build(ctx, "none")
        # as in the tutorial: the frozen backbone's BatchNorm runs in train mode while training
        return _epoch_ceilings(ctx, self.settings(ctx), self._model, self._model.fc.parameters())

    def run_epochs(self, ctx: Context, out: Path, epochs: int) -> tuple[float, list[dict]]:
        a, s, pre = ctx.args, self.settings(ctx), ctx.prep
        torch.manual_seed(0)
        norm = transforms.Normalize(pre.mean, pre.std)
        tfs = {"train": transforms.Compose([transforms.RandomResizedCrop(pre.crop), transforms.RandomHorizontalFlip(),
                                            transforms.ToTensor(), norm]),
               "val": transforms.Compose([transforms.Resize(pre.resize), transforms.CenterCrop(pre.crop),
                                          transforms.ToTensor(), norm])}
        # The tutorial's 4 workers on a small machine: torch warns, the recipe stands (and is labelled).
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        sets = {k: torchvision.datasets.ImageFolder(Path(a.data) / k, tf) for k, tf in tfs.items()}
        loaders = {k: torch.utils.data.DataLoader(d, batch_size=s.batch, shuffle=k == "train",
                                                  num_workers=TUTORIAL["workers"]) for k, d in sets.items()}
        start = time.perf_counter()
        model = self._build(ctx, a.weights)
        opt = torch.optim.SGD(model.fc.parameters(), lr=TUTORIAL["lr"], momentum=TUTORIAL["momentum"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=TUTORIAL["lr_step"], gamma=TUTORIAL["lr_gamma"])
        loss_fn = torch.nn.CrossEntropyLoss()
        history = []
        for _ in range(epochs):
            t = time.perf_counter()
            model.train()  # as in the tutorial: frozen BatchNorm still updates its running statistics
            n_train = 0
            for x, y in loaders["train"]:
                x, y = self._to(x, ctx, s), y.to(ctx.device)
                with autocast(ctx.device, s.precision):
                    logits = model(x)
                opt.zero_grad()
                loss_fn(logits.float(), y).backward()
                opt.step()
                n_train += len(y)
            sched.step()
            model.eval()
            correct = n_val = 0
            with torch.no_grad():
                for x, y in loaders["val"]:
                    with autocast(ctx.device, s.precision):
                        logits = model(self._to(x, ctx, s))
                    correct += int((logits.argmax(1).cpu() == y).sum())
                    n_val += len(y)
            history.append({"train_images": n_train, "val_images": n_val, "epoch_time_s": time.perf_counter() - t,
                            "val_acc": correct / n_val if n_val else None})
        return time.perf_counter() - start, history

    @staticmethod
    def _to(x: torch.Tensor, ctx: Context, s: Settings) -> torch.Tensor:
        return x.to(ctx.device).contiguous(memory_format=_layout(s.channels_last))


_TUTORIAL_LOADER = f"ImageFolder + PIL transforms, {TUTORIAL['workers']} DataLoader workers, BatchNorm in train mode"
PATHS: list[BenchPath] = [CachePath(), FinetunePath(), TutorialFixedPath()]


def selected_paths(args: argparse.Namespace) -> list[BenchPath]:
    """PATHS, with the lpft path right after finetune when --lpft is given."""
    if not args.lpft:
        return list(PATHS)
    at = next(i for i, p in enumerate(PATHS) if isinstance(p, FinetunePath)) + 1
    return PATHS[:at] + [LPFTPath()] + PATHS[at:]


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _differs(s: Settings, more: list[str]) -> list[str]:
    """The tutorial-recipe differences of an epoch path's settings, then `more`."""
    out = []
    if s.batch != TUTORIAL["batch"]:
        out.append(f"batch {s.batch} (tutorial: {TUTORIAL['batch']})")
    if s.precision != TUTORIAL["precision"]:
        out.append(f"{s.precision} autocast (tutorial: fp32)")
    if s.channels_last != TUTORIAL["channels_last"]:
        out.append("channels_last (tutorial: NCHW)")
    return out + more


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
