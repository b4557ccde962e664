"""End-to-end fine-tuning of a pretrained ResNet on an image folder (`cnncodes finetune`).

Defaults follow PyTorch's transfer-learning tutorial: SGD (lr 1e-3, momentum 0.9),
StepLR(7, 0.1), RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation.
The final-epoch model is the one reported and saved; picking an epoch on the validation
split is opt-in (`select_best_on_val`) and labelled optimistic.

Resume is exact: every random choice is a function of (seed, epoch, image), and the
checkpoint holds model, optimizer, scheduler, scaler and RNG states as plain tensors.
Under `torchrun` the same code trains with DistributedDataParallel; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import backbones, classifier, data, distributed, runtime
from .errors import CnnCodesError, Interrupted

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
OPTIMIZERS = ("sgd", "adamw")
VAL_SPLITS = ("val", "valid", "validation")
CHECKPOINT_FORMAT = "cnncodes-finetune-checkpoint"
CHECKPOINT, LOG_CSV, LOG_JSON, CURVES = "checkpoint.pt", "log.csv", "log.json", "curves.png"
MODEL, BEST_MODEL = "model.pt", "model_best_on_val.pt"
OUTPUTS = (CHECKPOINT, LOG_CSV, LOG_JSON, CURVES, MODEL, "model.json", BEST_MODEL, "model_best_on_val.json")
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "train_images", "val_loss", "val_acc", "val_images",
              "images_per_s", "train_time_s", "epoch_time_s", "skipped_files")
# Recipe keys that may differ on --resume: more epochs extend the run, and a new world size
# only changes how the data are split between processes.
RESUMABLE_CHANGES = ("epochs", "world_size")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; stored in the checkpoint, checked on resume."""

    arch: str
    weights: str  # WeightsInfo.identity
    classes: tuple[str, ...]
    preprocessing: dict
    epochs: int
    batch_size: int
    lr: float
    head_lr_mult: float
    weight_decay: float
    optimizer: str
    lr_step: int
    lr_gamma: float
    freeze: tuple[str, ...]
    precision: str
    channels_last: bool
    seed: int
    deterministic: bool
    select_best_on_val: bool
    world_size: int

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class FinetuneResult:
    """What a run produced. `final` holds the honest numbers: the last epoch's, on the saved model."""

    run_dir: Path
    model_path: Path
    checkpoint_path: Path
    log_csv: Path
    log_json: Path
    curves_path: Path
    classes: list[str]
    has_val: bool
    final: dict
    history: list[dict]
    best_on_val: dict | None = None  # OPTIMISTIC: the epoch was chosen on the validation split
    best_model_path: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> reason
    resumed_from_epoch: int = 0


# --------------------------------------------------------------------------- model pieces


def parse_freeze(freeze: str | Iterable[str] | None) -> tuple[str, ...]:
    """'stem,layer1' or an iterable of stage names -> a validated tuple in network order."""
    if freeze is None:
        return ()
    names = freeze.split(",") if isinstance(freeze, str) else list(freeze)
    names = {n.strip() for n in names if n.strip()}
    unknown = sorted(names - set(STAGES))
    if unknown:
        raise CnnCodesError(f"--freeze: unknown stage(s) {', '.join(unknown)}; choose among {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def stage_modules(model: nn.Module, stage: str) -> list[nn.Module]:
    return [model.conv1, model.bn1] if stage == "stem" else [getattr(model, stage)]


def freeze_stages(model: nn.Module, stages: Sequence[str]) -> list[nn.Module]:
    """Stop gradients into `stages` and return their modules (kept in eval mode by `set_train_mode`)."""
    frozen = [m for s in stages for m in stage_modules(model, s)]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    """Train mode, except frozen stages: their BatchNorm running statistics must not move."""
    model.train()
    for m in frozen:
        m.eval()


class _MeanPool(nn.Module):
    """Global average pooling with a deterministic CUDA backward (AdaptiveAvgPool2d's is not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def build_model(arch: str, weights: str | backbones.WeightsInfo | None, num_classes: int, freeze: Sequence[str], device: torch.device,
                channels_last: bool, deterministic: bool = False):
    """Pretrained ResNet with a fresh fc for `num_classes`, frozen stages, on `device`.

    Returns (model, weights info, frozen modules).
    """
    model, info = backbones.create_model(arch, weights, num_classes=num_classes)
    frozen = freeze_stages(model, freeze)
    if deterministic and device.type == "cuda":
        model.avgpool = _MeanPool()  # stateless: the state_dict is unchanged
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info, frozen


def build_optimizer(model: nn.Module, name: str, lr: float, head_lr_mult: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW over the trainable parameters; the new fc gets lr * head_lr_mult."""
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("fc.")]
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("fc.")]
    groups = ([{"params": body, "lr": lr}] if body else []) + [{"params": head, "lr": lr * head_lr_mult}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise CnnCodesError(f"unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}")


def onehot_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy without NLLLoss's gather/scatter, which has no deterministic CUDA kernel."""
    onehot = target[:, None] == torch.arange(logits.shape[1], device=logits.device)
    losses = -(F.log_softmax(logits, dim=1) * onehot).sum(dim=1)
    return losses.sum() if reduction == "sum" else losses.mean()


def loss_function(deterministic: bool, device: torch.device) -> Callable:
    return onehot_cross_entropy if deterministic and device.type == "cuda" else F.cross_entropy


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
        with runtime.autocast(self.device, self.precision):
            logits = self.model(x)
        loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # a no-op scale unless fp16
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach() * y.numel(), (logits.detach().argmax(1) == y).sum()


# --------------------------------------------------------------------------- data pieces


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
class _Split:
    name: str
    files: list[data.ImageFile]
    dataset: data.ImageFiles
    labels: torch.Tensor


def _split(layout: data.FolderLayout, name: str, preprocessing: data.Preprocessing, transform) -> _Split:
    files = layout.splits[name]
    paths = [f.path for f in files]
    dataset = data.ImageFiles(layout.root, paths, preprocessing.load, transform)
    return _Split(name, files, dataset, torch.tensor([f.label for f in files], dtype=torch.long))


# --------------------------------------------------------------------------- epochs


@dataclass
class _Sums:
    """One phase's sums on this rank; `reduce` adds them up over ranks in one collective."""

    loss: torch.Tensor  # on the device: accumulated without a host sync per step
    correct: torch.Tensor
    count: int
    failed: torch.Tensor  # CPU, per sample: the file could not be decoded
    seen: torch.Tensor  # CPU, per sample: training uses
    per_rank: list[int] = field(default_factory=list)  # images each rank used, after `reduce`
    reasons: dict[int, str] = field(default_factory=dict)

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> _Sums:
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

    def reduce(self, device: torch.device) -> _Sums:
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
class _Run:
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
    train: _Split
    val: _Split | None
    views: TrainViews
    workers: int
    progress: bool
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    best: dict | None = None


def train_epoch(run: _Run, epoch: int, max_steps: int | None = None) -> tuple[_Sums, float]:
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
    sums = _Sums.zeros(len(run.train.dataset), run.device)
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
def evaluate(model: nn.Module, split: _Split, normalize: nn.Module, device: torch.device, precision: str,
             batch_size: int, workers: int, progress: bool = False, desc: str = "eval",
             loss_fn: Callable = F.cross_entropy) -> _Sums:
    """Loss and accuracy of `model` (eval mode) on this rank's shard of `split`, summed over ranks."""
    sampler = distributed.ShardSampler(len(split.dataset))
    loader = data.make_loader(split.dataset, batch_size, workers, device, sampler=sampler)
    sums = _Sums.zeros(len(split.dataset), device)
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


def _bar_loss(bar, sums: _Sums) -> None:
    """Show the running loss about once a second (reading it syncs with the GPU)."""
    now = time.monotonic()
    if getattr(bar, "disable", True) or now - getattr(bar, "_last_postfix", 0.0) < 1.0:
        return
    bar._last_postfix = now
    bar.set_postfix(loss=f"{sums.loss.item() / max(1, sums.count):.4f}", refresh=False)


def _run_epoch(run: _Run, epoch: int, echo: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    train, train_seconds = train_epoch(run, epoch)
    val = None
    if run.val is not None:
        val = evaluate(run.model, run.val, run.normalize, run.device, run.recipe.precision, run.recipe.batch_size,
                       run.workers, run.progress, f"epoch {epoch + 1}/{run.recipe.epochs} val",
                       loss_function(run.recipe.deterministic, run.device))
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


def _collect_skips(run: _Run, sums: _Sums, split: _Split) -> list[str]:
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


def _reason(split: _Split, index: int) -> str:
    try:
        split.dataset.load(split.dataset.root / split.dataset.paths[index])
    except data.BadImage as e:
        return str(e)
    return "could not be read during training (readable now)"


# --------------------------------------------------------------------------- run folder


def _run_dir_problem(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Why this run may not use `run_dir` as asked (None: fine); --overwrite clears old outputs."""
    present = [name for name in OUTPUTS if (run_dir / name).exists()]
    if overwrite:
        for name in present:
            (run_dir / name).unlink()
        return None
    if not present:
        return None
    if resume and (run_dir / CHECKPOINT).exists():
        return None
    if resume:
        return (f"{run_dir}: holds outputs of a run ({', '.join(present)}) but no {CHECKPOINT} to resume from; "
                f"pass --overwrite to start over")
    what = _checkpoint_summary(run_dir / CHECKPOINT)
    return (f"{run_dir}: already holds a fine-tuning run{what}; pass --resume to continue it, "
            f"or --overwrite to start over (its outputs will be deleted)")


def _checkpoint_summary(path: Path) -> str:
    if not path.exists():
        return ""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return f" (checkpoint after epoch {ckpt['epoch']}/{ckpt['recipe']['epochs']})"
    except Exception:  # noqa: BLE001  (a summary only; the refusal stands either way)
        return ""


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CnnCodesError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"pass --overwrite to start over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CnnCodesError(f"{path}: not a cnncodes fine-tuning checkpoint; pass --overwrite to start over")
    return ckpt


def _resume_problem(ckpt: dict, recipe: Recipe) -> str | None:
    saved, now = ckpt["recipe"], recipe.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
             if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diffs:
        return ("--resume with different settings than the checkpoint (" + "; ".join(diffs) +
                "); rerun with the original options, or pass --overwrite to start over")
    if ckpt["epoch"] > recipe.epochs:
        return f"--epochs {recipe.epochs} is below the {ckpt['epoch']} epochs already trained; pass --epochs >= {ckpt['epoch']}"
    return None


def _checkpoint(run: _Run, epoch: int) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "epoch": epoch,
        "recipe": run.recipe.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "history": run.history,
        "skipped": run.skipped,
        "best": run.best,
    }


def _restore(run: _Run, ckpt: dict) -> int:
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.history = list(ckpt["history"])
    run.skipped = dict(ckpt["skipped"])
    run.best = ckpt["best"]
    return int(ckpt["epoch"])


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors (loadable with weights_only=True)."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(keys, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device):
    """Deterministic algorithms (and no cuDNN autotuning) inside; the previous settings after."""
    cudnn = torch.backends.cudnn
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                cudnn.deterministic, cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility requirement
        torch.use_deterministic_algorithms(True)
        cudnn.deterministic, cudnn.benchmark = True, False
    elif device.type == "cuda":
        cudnn.benchmark = True  # fixed input size: autotuned convolutions pay off from the 2nd step
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cudnn.deterministic, cudnn.benchmark = previous[2], previous[3]


# --------------------------------------------------------------------------- reports


def _write_logs(run: _Run, run_dir: Path, layout: data.FolderLayout, final: bool = False) -> None:
    """log.csv and log.json rewritten from the history: a resumed run never duplicates rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in run.history:
        writer.writerow({k: "" if entry.get(k) is None else entry[k] for k in CSV_FIELDS})
    with runtime.atomic_path(run_dir / LOG_CSV) as tmp:
        tmp.write_text(buf.getvalue())
    doc = {
        "data": str(layout.root),
        "classes": list(run.recipe.classes),
        "train_images": len(run.train.files),
        "val_images": len(run.val.files) if run.val else 0,
        "recipe": run.recipe.to_dict(),
        "epochs": run.history,
        "skipped_files": run.skipped,
        "finished": final,
        "reported": "final epoch" + ("" if run.val else " (no val split: train metrics only)"),
        "best_on_val_OPTIMISTIC": run.best,
    }
    with runtime.atomic_path(run_dir / LOG_JSON) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val, as a PNG (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    epochs = [h["epoch"] for h in history]
    for ax, metric, label in zip(fig.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy")):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{metric}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    with runtime.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _epoch_line(entry: dict, epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}", f"lr {entry['lr']:.3g}",
             f"train loss {_fmt(entry['train_loss'])} acc {_pct(entry['train_acc'])}"]
    if entry["val_acc"] is not None or entry["val_images"] is not None:
        parts.append(f"val loss {_fmt(entry['val_loss'])} acc {_pct(entry['val_acc'])}")
    if entry["images_per_s"]:
        parts.append(f"{entry['images_per_s']:.1f} img/s")
    parts.append(f"{entry['epoch_time_s']:.1f} s")
    if entry["skipped_files"]:
        parts.append(f"skipped {entry['skipped_files']} unreadable file(s)")
    return "  ".join(parts)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _final_lines(run: _Run, model_path: Path, best_path: Path | None) -> list[str]:
    final = run.history[-1]
    lines = []
    if run.val is not None:
        lines.append(f"final model (epoch {final['epoch']}/{run.recipe.epochs}): val acc {_pct(final['val_acc'])} "
                     f"on {final['val_images']} images, val loss {_fmt(final['val_loss'])} -> {model_path}")
    else:
        lines.append(f"final model (epoch {final['epoch']}/{run.recipe.epochs}) -> {model_path}")
        lines.append(f"no val split: train metrics only (train acc {_pct(final['train_acc'])}, loss "
                     f"{_fmt(final['train_loss'])}, measured on augmented crops while the weights changed; "
                     f"not an estimate of accuracy on new images)")
    if run.best is not None:
        lines.append(f"OPTIMISTIC: chosen on the validation split: best epoch {run.best['epoch']} val acc "
                     f"{_pct(run.best['val_acc'])} -> {best_path} (biased upward; quote the final-epoch figure "
                     f"or evaluate on a held-out test split)")
    if run.skipped:
        lines.append(f"skipped {len(run.skipped)} unreadable file(s) (listed in {LOG_JSON})")
    return lines


# --------------------------------------------------------------------------- API


def finetune(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    arch: str = "resnet18",
    weights: str | None = "DEFAULT",
    epochs: int = 25,
    batch_size: int = 32,
    lr: float = 1e-3,
    head_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    lr_step: int = 7,
    lr_gamma: float = 0.1,
    freeze: str | Iterable[str] | None = None,
    image_size: int | None = None,
    precision: str = "fp32",
    channels_last: bool = True,
    workers: int | None = None,
    device: str = "auto",
    seed: int = 0,
    deterministic: bool = False,
    select_best_on_val: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune `arch` end to end on the image folder `data_dir`, writing the run to `out_dir`.

    Writes `out_dir`/checkpoint.pt every epoch, log.csv, log.json, curves.png and the final-epoch
    classifier model.pt (+ model.json, see `classifier.save_classifier`). Under torchrun
    (WORLD_SIZE > 1) trains with DistributedDataParallel; only rank 0 writes and prints.
    `progress=None` shows a progress bar when stderr is a terminal.
    """
    _check_numbers(epochs, batch_size, lr, head_lr_mult, weight_decay, lr_step, lr_gamma, image_size, workers)
    if optimizer not in OPTIMIZERS:
        raise CnnCodesError(f"unknown optimizer '{optimizer}'; use one of {', '.join(OPTIMIZERS)}")
    if resume and overwrite:
        raise CnnCodesError("--resume and --overwrite contradict each other; pass one")
    stages = parse_freeze(freeze)
    backbones.check_arch(arch)
    own_group = distributed.launched() and not distributed.is_distributed()
    dev = distributed.init(runtime.resolve_device(device))
    try:
        runtime.check_precision(precision, dev)
        with determinism(deterministic, dev):
            return _finetune(Path(data_dir), Path(out_dir), arch=arch, weights=weights, epochs=epochs,
                             batch_size=batch_size, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay,
                             optimizer=optimizer, lr_step=lr_step, lr_gamma=lr_gamma, freeze=stages,
                             image_size=image_size, precision=precision, channels_last=channels_last,
                             workers=workers, device=dev, seed=seed, deterministic=deterministic,
                             select_best_on_val=select_best_on_val, resume=resume, overwrite=overwrite,
                             progress=progress, echo=echo)
    finally:
        if own_group:
            distributed.cleanup()


def _check_numbers(epochs, batch_size, lr, head_lr_mult, weight_decay, lr_step, lr_gamma, image_size, workers) -> None:
    checks = [
        (epochs >= 1, "--epochs must be >= 1"),
        (batch_size >= 2, "--batch-size must be >= 2 (BatchNorm cannot train on one image)"),
        (lr > 0, "--lr must be > 0"),
        (head_lr_mult > 0, "--head-lr-mult must be > 0"),
        (weight_decay >= 0, "--weight-decay must be >= 0"),
        (lr_step >= 1, "--lr-step must be >= 1"),
        (0 < lr_gamma <= 1, "--lr-gamma must be in (0, 1]"),
        (image_size is None or image_size >= 32, "--image-size must be >= 32 (ResNets downsample 32x)"),
        (workers is None or workers >= 0, "--workers must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise CnnCodesError(message)


def _layout(data_dir: Path, echo) -> tuple[data.FolderLayout, str | None]:
    layout = data.discover(data_dir)
    if "train" not in layout.splits:
        raise CnnCodesError(f"{data_dir}: split folders ({', '.join(layout.splits)}) but no train/; finetune needs "
                            f"{data_dir}/train/<class>/<image> or {data_dir}/<class>/<image>")
    if not layout.splits["train"]:
        raise CnnCodesError(f"{data_dir}/train: no training images")
    if len(layout.classes) < 2:
        raise CnnCodesError(f"{data_dir}: only one class ({layout.classes[0]}); a classifier needs at least two class folders")
    if distributed.is_main():
        for note in layout.warnings:
            echo(f"warning: {note}")
        ignored = [p for entries in layout.ignored.values() for p, _ in entries]
        if ignored:
            echo(f"ignored {len(ignored)} non-image file(s), e.g. {ignored[0]}")
        if "test" in layout.splits:
            echo(f"note: test split ({len(layout.splits['test'])} images) is not used by finetune; "
                 f"evaluate the saved model on it with cnncodes predict")
    val = next((s for s in VAL_SPLITS if layout.splits.get(s)), None)
    return layout, val


def _finetune(data_dir: Path, run_dir: Path, *, arch, weights, epochs, batch_size, lr, head_lr_mult, weight_decay,
              optimizer, lr_step, lr_gamma, freeze, image_size, precision, channels_last, workers, device, seed,
              deterministic, select_best_on_val, resume, overwrite, progress, echo) -> FinetuneResult:
    main = distributed.is_main()
    echo = echo if main else (lambda _msg: None)
    layout, val_name = _layout(data_dir, echo)
    if select_best_on_val and val_name is None:
        raise CnnCodesError("--select-best-on-val needs a val split (DATA/val/<class>/<image>)")
    info = backbones.resolve_weights(arch, weights)
    prep = backbones.default_preprocessing(arch, info)
    if image_size:
        prep = data.Preprocessing.for_image_size(image_size, prep)
    recipe = Recipe(arch, info.identity, tuple(layout.classes), prep.to_dict(), epochs, batch_size, lr, head_lr_mult,
                    weight_decay, optimizer, lr_step, lr_gamma, tuple(freeze), precision, channels_last, seed,
                    deterministic, select_best_on_val, distributed.world_size())
    with contextlib.ExitStack() as stack:
        ckpt, problem = None, None
        if main:
            try:
                if run_dir.exists() and not run_dir.is_dir():
                    raise CnnCodesError(f"{run_dir}: exists and is not a folder; pass -o a new or existing run folder")
                stack.enter_context(runtime.FileLock(run_dir / "run", f"run folder {run_dir}"))
                problem = _run_dir_problem(run_dir, resume, overwrite)
                if problem is None and resume and (run_dir / CHECKPOINT).exists():
                    ckpt = _load_checkpoint(run_dir / CHECKPOINT)
                    problem = _resume_problem(ckpt, recipe)
            except CnnCodesError as e:
                problem = str(e)
            except OSError as e:
                problem = f"{run_dir}: cannot use as run folder ({e.strerror or e}); check the path and its permissions"
        distributed.share_error(problem, device)
        if not main and resume and (run_dir / CHECKPOINT).exists():
            ckpt = _load_checkpoint(run_dir / CHECKPOINT)
        return _train(layout, val_name, run_dir, recipe, info, prep, ckpt, device, workers,
                      select_best_on_val, progress, echo)


def setup_run(layout: data.FolderLayout, val_name: str | None, recipe: Recipe, weights: str | backbones.WeightsInfo | None,
              prep: data.Preprocessing, device: torch.device, workers: int | None, progress: bool | None) -> _Run:
    """Model, optimizer, scheduler, scaler (DDP-wrapped under torchrun) and datasets for `recipe`."""
    seed_everything(recipe.seed)
    model, frozen = _build_model_rank0_first(recipe, weights, device)
    opt = build_optimizer(model, recipe.optimizer, recipe.lr, recipe.head_lr_mult, recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=recipe.precision == "fp16" and device.type == "cuda")
    workers = data.default_workers(device, distributed.process_cores()) if workers is None else workers
    runtime.configure_threads(device)  # each process on a machine takes its share of the cores
    trainer = model
    if distributed.is_distributed():
        trainer = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    views = TrainViews(prep, [f.path for f in layout.splits["train"]], recipe.seed)
    return _Run(
        recipe=recipe, device=device, model=model, trainer=trainer, frozen=frozen, optimizer=opt,
        scheduler=scheduler, scaler=scaler,
        normalize=data.Normalize(prep.mean, prep.std, recipe.channels_last).to(device),
        train=_split(layout, "train", prep, views),
        val=_split(layout, val_name, prep, EvalView(prep)) if val_name else None,
        views=views, workers=workers,
        progress=(sys.stderr.isatty() if progress is None else progress) and distributed.is_main(),
    )


def _build_model_rank0_first(recipe: Recipe, weights: str | backbones.WeightsInfo | None, device: torch.device):
    """Rank 0 fetches the weights (into the torch hub cache) before the other ranks read them."""
    built, problem = None, None
    if distributed.is_main():
        try:
            built = build_model(recipe.arch, weights, len(recipe.classes), recipe.freeze, device,
                                recipe.channels_last, recipe.deterministic)
        except CnnCodesError as e:
            problem = str(e)
    distributed.share_error(problem, device)
    if built is None:
        built = build_model(recipe.arch, weights, len(recipe.classes), recipe.freeze, device,
                            recipe.channels_last, recipe.deterministic)
    model, _, frozen = built
    return model, frozen


def _train(layout, val_name, run_dir: Path, recipe: Recipe, weights, prep, ckpt, device, workers,
           select_best_on_val, progress, echo) -> FinetuneResult:
    run = setup_run(layout, val_name, recipe, weights, prep, device, workers, progress)
    start_epoch = _restore(run, ckpt) if ckpt is not None else 0
    if start_epoch:
        echo(f"resuming {run_dir} after epoch {start_epoch}/{recipe.epochs}")
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    best_path = run_dir / BEST_MODEL if select_best_on_val else None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, recipe.epochs):
            entry = _run_epoch(run, epoch, echo)
            run.history.append(entry)
            echo(_epoch_line(entry, recipe.epochs))
            if main:
                _after_epoch(run, entry, run_dir, layout, best_path)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped during epoch {epoch + 1}/{recipe.epochs}; {len(run.history)} finished epoch(s) "
                          f"are saved in {run_dir / CHECKPOINT}: rerun the same command with --resume to continue") from None
    return _finish(run, run_dir, layout, best_path, start_epoch, echo)


def _after_epoch(run: _Run, entry: dict, run_dir: Path, layout, best_path: Path | None) -> None:
    """Rank 0: best-on-val copy (if asked), then the checkpoint, then the logs (rebuilt from it on resume)."""
    if best_path is not None and entry["val_acc"] is not None and (
            run.best is None or entry["val_acc"] > run.best["val_acc"]):
        run.best = {k: entry[k] for k in ("epoch", "val_acc", "val_loss", "val_images")}
        _save_model(run, best_path, layout, selected=f"epoch {entry['epoch']}, best val acc (OPTIMISTIC)")
    runtime.save_torch_atomic(_checkpoint(run, entry["epoch"]), run_dir / CHECKPOINT)
    _write_logs(run, run_dir, layout)


def _save_model(run: _Run, path: Path, layout, selected: str) -> None:
    r = run.recipe
    source = {
        "command": "finetune",
        "weights": r.weights,
        "data": str(layout.root),
        "epochs": r.epochs,
        "selected": selected,
        "recipe": r.to_dict(),
    }
    classifier.save_classifier(run.model, path, r.arch, list(r.classes),
                               data.Preprocessing.from_dict(r.preprocessing), source)


def _finish(run: _Run, run_dir: Path, layout, best_path, start_epoch: int, echo) -> FinetuneResult:
    model_path = run_dir / MODEL
    if distributed.is_main():
        _save_model(run, model_path, layout, selected=f"final epoch {run.history[-1]['epoch']}")
        _write_logs(run, run_dir, layout, final=True)
        plot_curves(run.history, run_dir / CURVES)
        for line in _final_lines(run, model_path, best_path):
            echo(line)
    distributed.barrier()  # no rank exits (and tears the group down) while rank 0 still writes
    return FinetuneResult(
        run_dir=run_dir, model_path=model_path, checkpoint_path=run_dir / CHECKPOINT, log_csv=run_dir / LOG_CSV,
        log_json=run_dir / LOG_JSON, curves_path=run_dir / CURVES, classes=list(run.recipe.classes),
        has_val=run.val is not None, final=dict(run.history[-1]), history=list(run.history),
        best_on_val=run.best, best_model_path=best_path if run.best else None, skipped=dict(run.skipped),
        resumed_from_epoch=start_epoch,
    )
