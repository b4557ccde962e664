"""Train and evaluate one epoch: the train step, the data views, the per-rank sums, the epoch's log entry.

Run (model, optimizer, splits, ...) + epoch -> `train_epoch` / `evaluate` -> Sums over ranks ->
`run_epoch`'s entry (one row of log.csv). Random views are a function of (seed, epoch, image).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .. import data, distributed, runtime
from .config import Recipe
from .model import loss_function, set_train_mode


class TrainStep:
    """One optimisation step on a uint8 batch: normalise on the device, forward, backward, update.

    Returns (summed loss, number correct) as device tensors, so no host sync per step.
    """

    def __init__(self, model: nn.Module, normalize: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, precision: str, loss_fn: Callable):
        self.model, self.normalize, self.optimizer, self.scaler = model, normalize, optimizer, scaler
        self.device, self.precision, self.loss_fn = device, precision, loss_fn

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images.to(self.device, non_blocking=True))
        y = labels.to(self.device, non_blocking=True)
        # TF32 only for --precision tf32, in the backward pass too: fp32 means fp32 on CUDA
        with runtime.tf32(self.precision == "tf32"):
            with runtime.autocast(self.device, self.precision):
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # a no-op scale unless fp16
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach() * y.numel(), (logits.detach().argmax(1) == y).sum()


class TrainViews:
    """Random crop + flip drawn from a generator seeded by (seed, epoch, image): exact on resume."""

    def __init__(self, preprocessing: data.Preprocessing, paths: Sequence[str], seed: int):
        self.preprocessing, self.paths, self.seed = preprocessing, list(paths), seed
        self.epoch = 0  # set before each epoch; workers are forked per epoch and copy it

    def __call__(self, img, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(data.view_seed(self.seed, self.paths[index], self.epoch))
        return self.preprocessing.random_view(img, g)


class EvalView:
    """Resize + CenterCrop."""

    def __init__(self, preprocessing: data.Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, img, index: int) -> torch.Tensor:
        return self.preprocessing.eval_view(img)


@dataclass
class Split:
    """One split's files, their dataset (decode + view) and labels."""

    name: str
    files: list[data.ImageFile]
    dataset: data.ImageFiles
    labels: torch.Tensor


def make_split(layout: data.FolderLayout, name: str, preprocessing: data.Preprocessing, transform) -> Split:
    """The split `name` of `layout`, each image decoded by `preprocessing` and viewed by `transform`."""
    files = layout.splits[name]
    paths = [f.path for f in files]
    dataset = data.ImageFiles(layout.root, paths, preprocessing.load, transform)
    return Split(name, files, dataset, torch.tensor([f.label for f in files], dtype=torch.long))


@dataclass
class Sums:
    """One phase's sums on this rank; `reduce` adds them up over ranks in one collective."""

    loss: torch.Tensor  # on the device: accumulated without a host sync per step
    correct: torch.Tensor
    count: int
    failed: torch.Tensor  # CPU, per sample: the file could not be decoded
    seen: torch.Tensor  # CPU, per sample: training uses
    per_rank: list[int] = field(default_factory=list)  # images each rank used, after `reduce`
    reasons: dict[int, str] = field(default_factory=dict)

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> Sums:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), 0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))

    def add(self, loss: torch.Tensor, correct: torch.Tensor, indices: torch.Tensor) -> None:
        self.loss += loss
        self.correct += correct
        self.count += len(indices)
        self.seen.index_add_(0, indices, torch.ones(len(indices), dtype=torch.float64))

    def note_failures(self, batch: data.Batch) -> None:
        for i, reason in batch.failed:
            self.failed[i] = 1
            self.reasons[i] = reason

    def reduce(self, device: torch.device) -> Sums:
        n, world = len(self.failed), distributed.world_size()
        mine = torch.zeros(world, dtype=torch.float64)
        mine[distributed.rank()] = self.count
        flat = torch.cat([torch.stack([self.loss, self.correct]).cpu(), mine, self.failed, self.seen])
        if distributed.is_distributed():
            flat = distributed.all_reduce_sum(flat.to(distributed.comm_device(device))).cpu()
        self.loss, self.correct = flat[0], flat[1]
        self.per_rank = [int(v) for v in flat[2:2 + world].tolist()]
        self.count = sum(self.per_rank)
        self.failed, self.seen = flat[2 + world:2 + world + n], flat[2 + world + n:]
        return self


@dataclass
class Run:
    """The live state of one fine-tuning run."""

    recipe: Recipe
    device: torch.device
    model: nn.Module  # unwrapped
    trainer: nn.Module  # DDP wrapper or the model itself
    frozen: list[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    normalize: nn.Module
    train: Split
    val: Split | None
    views: TrainViews
    workers: int
    progress: bool
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    best: dict | None = None


def train_epoch(run: Run, epoch: int, max_steps: int | None = None) -> tuple[Sums, float]:
    """One pass over this rank's shard (or its first `max_steps` batches, for benchmarks).

    Returns the sums over ranks and the seconds the pass took (loader start-up included).
    """
    r = run.recipe
    run.views.epoch = epoch
    sampler = DistributedSampler(run.train.dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=r.seed)
    sampler.set_epoch(epoch)
    loader = data.make_loader(run.train.dataset, r.batch_size, run.workers, run.device, sampler=sampler,
                              generator=torch.Generator().manual_seed(r.seed * 100_003 + epoch))
    step = TrainStep(run.trainer, run.normalize, run.optimizer, run.scaler, run.device, r.precision,
                     loss_function(r.deterministic, run.device))
    sums = Sums.zeros(len(run.train.dataset), run.device)
    set_train_mode(run.trainer, run.frozen)
    bar = _bar(loader, f"epoch {epoch + 1}/{r.epochs} train", run.progress)
    join = run.trainer.join() if distributed.is_distributed() else contextlib.nullcontext()
    start = time.perf_counter()
    with join:  # a rank whose batch was all unreadable skips a step; join keeps the others from hanging
        for steps, batch in enumerate(bar):
            if steps == max_steps:
                break
            sums.note_failures(batch)
            if len(batch.indices) < 2:  # BatchNorm cannot train on a single image
                continue
            sums.add(*step(batch.images, run.train.labels[batch.indices]), batch.indices)
            _bar_loss(bar, sums)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    run.scheduler.step()
    return sums.reduce(run.device), seconds


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, normalize: nn.Module, device: torch.device, precision: str,
             batch_size: int, workers: int, progress: bool = False, desc: str = "eval",
             loss_fn: Callable = F.cross_entropy) -> Sums:
    """Loss and accuracy of `model` (eval mode) on this rank's shard of `split`, summed over ranks."""
    sampler = distributed.ShardSampler(len(split.dataset))
    loader = data.make_loader(split.dataset, batch_size, workers, device, sampler=sampler)
    sums = Sums.zeros(len(split.dataset), device)
    model.eval()
    for batch in _bar(loader, desc, progress):
        sums.note_failures(batch)
        if not len(batch.indices):
            continue
        y = split.labels[batch.indices].to(device, non_blocking=True)
        with runtime.autocast(device, precision):
            logits = model(normalize(batch.images.to(device, non_blocking=True)))
        sums.add(loss_fn(logits.float(), y, reduction="sum"), (logits.argmax(1) == y).sum(), batch.indices)
    return sums.reduce(device)


def _bar(loader, desc: str, progress: bool):
    return tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True,
                file=sys.stderr)


def _bar_loss(bar, sums: Sums) -> None:
    """Show the running loss about once a second (reading it syncs with the GPU)."""
    now = time.monotonic()
    if getattr(bar, "disable", True) or now - getattr(bar, "_last_postfix", 0.0) < 1.0:
        return
    bar._last_postfix = now
    bar.set_postfix(loss=f"{sums.loss.item() / max(1, sums.count):.4f}", refresh=False)


def _evaluate_val(run: Run, epoch: int) -> Sums | None:
    if run.val is None:
        return None
    return evaluate(run.model, run.val, run.normalize, run.device, run.recipe.precision, run.recipe.batch_size,
                    run.workers, run.progress, f"epoch {epoch}/{run.recipe.epochs} val",
                    loss_function(run.recipe.deterministic, run.device))


def initial_entry(run: Run, echo: Callable[[str], None]) -> dict:
    """Epoch 0: the model before any step (e.g. the --init-head head), evaluated on val; no training."""
    start = time.perf_counter()
    val = _evaluate_val(run, 0)
    for path in _collect_skips(run, val, run.val) if val else []:
        echo(f"skipped {path}: {run.skipped[path]}")
    return {
        "epoch": 0, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": None, "train_acc": None,
        "train_images": 0, "val_loss": _ratio(val.loss, val.count) if val else None,
        "val_acc": _ratio(val.correct, val.count) if val else None, "val_images": val.count if val else None,
        "images_per_s": None, "train_time_s": 0.0, "epoch_time_s": time.perf_counter() - start,
        "skipped_files": int(val.failed.count_nonzero().item()) if val else 0,
        "train_samples_per_rank": [], "train_samples_distinct": 0,
    }


def run_epoch(run: Run, epoch: int, echo: Callable[[str], None]) -> dict:
    """Train one epoch, evaluate on val (if any), report newly skipped files; returns the epoch's log entry."""
    start = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    train, train_seconds = train_epoch(run, epoch)
    val = _evaluate_val(run, epoch + 1)
    new_skips = _collect_skips(run, train, run.train) + (_collect_skips(run, val, run.val) if val else [])
    for path in new_skips:
        echo(f"skipped {path}: {run.skipped[path]}")
    n_train = train.count
    entry = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": _ratio(train.loss, train.count),
        "train_acc": _ratio(train.correct, train.count),
        "train_images": n_train,
        "val_loss": _ratio(val.loss, val.count) if val else None,
        "val_acc": _ratio(val.correct, val.count) if val else None,
        "val_images": val.count if val else None,
        "images_per_s": n_train / train_seconds if train_seconds > 0 else None,
        "train_time_s": train_seconds,
        "epoch_time_s": time.perf_counter() - start,
        "skipped_files": int(train.failed.count_nonzero().item()) + (int(val.failed.count_nonzero().item()) if val else 0),
        "train_samples_per_rank": train.per_rank,
        "train_samples_distinct": int(train.seen.count_nonzero().item()),
    }
    return entry


def _ratio(num: torch.Tensor, den: int) -> float | None:
    return num.item() / den if den else None


def _collect_skips(run: Run, sums: Sums, split: Split) -> list[str]:
    """Record newly failed files; reasons from other ranks are re-read here (rare, cheap)."""
    new = []
    for i in sums.failed.nonzero().flatten().tolist():
        path = split.files[i].path
        if path in run.skipped:
            continue
        reason = sums.reasons.get(i) or _reason(split, i)
        run.skipped[path] = reason
        new.append(path)
    return new


def _reason(split: Split, index: int) -> str:
    try:
        split.dataset.load(split.dataset.root / split.dataset.paths[index])
    except data.BadImage as e:
        return str(e)
    return "could not be read during training (readable now)"
