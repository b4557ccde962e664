"""The paths `bench/compare.py` measures: each one way to get a trained model from the same data.

  CachePath          extract the codes once, then fit each linear head on them
  FinetunePath       `cnncodes.finetune`, the tutorial's recipe
  LPFTPath           the same, its classifier started from the cache path's logreg head
  TutorialFixedPath  the PyTorch tutorial's fixed-extractor loop as written there

Adding a path: subclass `EpochPath` (or `BenchPath`), give it a name, `settings`, `ceilings` and
`run_once` (it can read the cache path's outputs from `ctx.outputs["cache"]`, as `LPFTPath`
does), and append an instance to PATHS.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from common import forward_ceiling, train_ceiling
from torchvision import transforms

from cnncodes.backbones import create_extractor, create_model
from cnncodes.data import Preprocessing
from cnncodes.extract import extract
from cnncodes.finetune import finetune
from cnncodes.finetune.config import INIT_HEAD_LR_MULT
from cnncodes.heads import fit_head
from cnncodes.runtime import autocast

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
