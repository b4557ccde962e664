"""`cnncodes.finetune.finetune` and the run's orchestration (see the package docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import backbones, data, distributed, runtime
from ..config import with_overrides
from ..errors import CnnCodesError, Interrupted
from ..manifest import ManifestOptions
from ..precision import emulation_note
from .config import VAL_SPLITS, FinetuneConfig, Recipe
from .loop import EvalView, Run, TrainViews, initial_entry, make_split, run_epoch
from .lpft import InitHead, load_init_head
from .model import (
    build_model_rank0_first,
    build_optimizer,
    deterministic_note,
    freeze_order,
)
from .report import epoch_line, final_lines, plot_curves, write_logs
from .rundir import (
    BEST_MODEL,
    CHECKPOINT,
    CURVES,
    LOG_CSV,
    LOG_JSON,
    MODEL,
    checkpoint_state,
    claim,
    determinism,
    restore,
    save_model,
    seed_everything,
)


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


def finetune(
    data_dir: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    manifest: ManifestOptions | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune end to end on the image folder `data_dir` (or the CSV manifest `data_dir`, read
    with `manifest` options), writing the run to `out_dir`.

    The recipe is `config` (default `FinetuneConfig()`) with `overrides`, any of its fields by name
    (`finetune(data, out, epochs=3, lr=0.01)`). `resume`, `overwrite`, `progress` and `echo` steer
    the run and do not change the weights. Writes `out_dir`/checkpoint.pt every epoch, log.csv,
    log.json, curves.png and the final-epoch classifier model.pt (+ model.json, see
    `classifier.save_classifier`). Under torchrun (WORLD_SIZE > 1) trains with
    DistributedDataParallel; only rank 0 writes and prints. `progress=None` shows a progress bar
    when stderr is a terminal.
    """
    config = with_overrides(FinetuneConfig, config, overrides, "finetune")
    if resume and overwrite:
        raise CnnCodesError("--resume and --overwrite contradict each other; pass one")
    own_group = distributed.launched() and not distributed.is_distributed()
    device = distributed.init(runtime.resolve_device(config.device))
    try:
        runtime.check_precision(config.precision, device)
        with determinism(config.deterministic, device):
            layout, val_name = _layout(Path(data_dir), manifest, echo)
            return _finetune(layout, val_name, Path(out_dir), config, device, resume, overwrite, progress, echo)
    finally:
        if own_group:
            distributed.cleanup()


def _layout(data_dir: Path, manifest: ManifestOptions | None, echo) -> tuple[data.FolderLayout, str | None]:
    """The image folder's (or manifest's) splits and classes, checked usable, and the name of its val split if any."""
    layout = data.discover(data_dir, manifest)
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
            what = "missing file(s) listed in the manifest" if layout.manifest else "non-image file(s)"
            echo(f"ignored {len(ignored)} {what}, e.g. {ignored[0]}")
        if "test" in layout.splits:
            echo(f"note: test split ({len(layout.splits['test'])} images) is not used by finetune; "
                 f"evaluate the saved model on it with cnncodes predict")
    val = next((s for s in VAL_SPLITS if layout.splits.get(s)), None)
    return layout, val


def _finetune(layout: data.FolderLayout, val_name: str | None, run_dir: Path, config: FinetuneConfig,
              device: torch.device, resume: bool,
              overwrite: bool, progress: bool | None, echo: Callable[[str], None]) -> FinetuneResult:
    echo = echo if distributed.is_main() else (lambda _msg: None)
    if config.select_best_on_val and val_name is None:
        raise CnnCodesError("--select-best-on-val needs a val split (DATA/val/<class>/<image>)")
    info = backbones.resolve_weights(config.arch, config.weights)
    prep = backbones.resolve_preprocessing(config.arch, info, config.image_size, config.preprocess_like, echo)
    # the arch decides which --freeze names exist and their order; checked before the run folder is touched
    config = dataclasses.replace(config, freeze=freeze_order(config.arch, config.freeze))
    notes = [deterministic_note(config.arch) if config.deterministic and device.type == "cuda" else None,
             emulation_note(config.precision, device)]
    for note in filter(None, notes):
        echo(f"note: {note}")
    init = None
    if config.init_head:  # checked before the run folder is touched
        init = load_init_head(config.init_head, config.arch, info.identity, prep, layout.classes)
        echo(f"LP-FT: classifier initialised from {init.describe()}; head lr x {config.resolved_head_lr_mult:g}")
    recipe = config.recipe(info.identity, layout.classes, prep.to_dict(), distributed.world_size(),
                           init.identity if init else None)
    with contextlib.ExitStack() as stack:
        ckpt = claim(stack, run_dir, recipe, resume, overwrite, device)
        if resume and ckpt is None and distributed.is_main():
            echo(f"note: --resume: no {CHECKPOINT} in {run_dir} yet; starting the run from epoch 0")
        return _train(layout, val_name, run_dir, recipe, info, prep, ckpt, device, config.workers, progress, echo,
                      init)


def setup_run(layout: data.FolderLayout, val_name: str | None, recipe: Recipe, weights: str | backbones.WeightsInfo | None,
              prep: data.Preprocessing, device: torch.device, workers: int | None, progress: bool | None,
              init: InitHead | None = None) -> Run:
    """Model (its classifier from `init` if given), optimizer, scheduler, scaler (DDP-wrapped under
    torchrun) and datasets for `recipe`."""
    seed_everything(recipe.seed)
    model, frozen, head = build_model_rank0_first(recipe, weights, device, init)
    opt = build_optimizer(model, recipe.optimizer, recipe.lr, recipe.head_lr_mult, recipe.weight_decay, head)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=recipe.precision == "fp16" and device.type == "cuda")
    workers = data.default_workers(device, runtime.process_cores()) if workers is None else workers
    runtime.configure_threads(device)  # each process on a machine takes its share of the cores
    trainer = model
    if distributed.is_distributed():
        trainer = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    views = TrainViews(prep, [f.path for f in layout.splits["train"]], recipe.seed)
    return Run(
        recipe=recipe, device=device, model=model, trainer=trainer, frozen=frozen, optimizer=opt,
        scheduler=scheduler, scaler=scaler,
        normalize=data.Normalize(prep.mean, prep.std, recipe.channels_last).to(device),
        train=make_split(layout, "train", prep, views),
        val=make_split(layout, val_name, prep, EvalView(prep)) if val_name else None,
        views=views, workers=workers,
        progress=(sys.stderr.isatty() if progress is None else progress) and distributed.is_main(),
    )


def _train(layout, val_name, run_dir: Path, recipe: Recipe, weights, prep, ckpt, device, workers,
           progress, echo, init: InitHead | None = None) -> FinetuneResult:
    run = setup_run(layout, val_name, recipe, weights, prep, device, workers, progress, init)
    start_epoch = restore(run, ckpt) if ckpt is not None else 0
    if start_epoch:
        echo(f"resuming {run_dir} after epoch {start_epoch}/{recipe.epochs}")
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    best_path = run_dir / BEST_MODEL if recipe.select_best_on_val else None
    epoch = start_epoch
    try:
        if _wants_epoch0(recipe) and not run.history:  # a resumed run has it in its history already
            entry = initial_entry(run, echo)
            run.history.append(entry)
            echo(epoch_line(entry, recipe.epochs))
            if main:
                _after_epoch(run, entry, run_dir, layout, best_path)
        for epoch in range(start_epoch, recipe.epochs):
            entry = run_epoch(run, epoch, echo)
            run.history.append(entry)
            echo(epoch_line(entry, recipe.epochs))
            if main:
                _after_epoch(run, entry, run_dir, layout, best_path)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped during epoch {epoch + 1}/{recipe.epochs}; {len(run.history)} finished epoch(s) "
                          f"are saved in {run_dir / CHECKPOINT}: rerun the same command with --resume to continue") from None
    return _finish(run, run_dir, layout, best_path, start_epoch, echo)


def _wants_epoch0(recipe: Recipe) -> bool:
    """An LP-FT run logs its starting point (the head's accuracy); an --epochs 0 run has nothing else."""
    return recipe.init_head is not None or recipe.epochs == 0


def _after_epoch(run: Run, entry: dict, run_dir: Path, layout, best_path: Path | None) -> None:
    """Rank 0: best-on-val copy (if asked), then the checkpoint, then the logs (rebuilt from it on resume)."""
    if best_path is not None and entry["val_acc"] is not None and (
            run.best is None or entry["val_acc"] > run.best["val_acc"]):
        run.best = {k: entry[k] for k in ("epoch", "val_acc", "val_loss", "val_images")}
        save_model(run, best_path, layout, selected=f"epoch {entry['epoch']}, best val acc (OPTIMISTIC)")
    runtime.save_torch_atomic(checkpoint_state(run, entry["epoch"]), run_dir / CHECKPOINT)
    write_logs(run, run_dir, layout)


def _finish(run: Run, run_dir: Path, layout, best_path, start_epoch: int, echo) -> FinetuneResult:
    model_path = run_dir / MODEL
    if distributed.is_main():
        save_model(run, model_path, layout, selected=f"final epoch {run.history[-1]['epoch']}")
        write_logs(run, run_dir, layout, final=True)
        plot_curves(run.history, run_dir / CURVES)
        for line in final_lines(run, model_path, best_path):
            echo(line)
    distributed.barrier()  # no rank exits (and tears the group down) while rank 0 still writes
    return FinetuneResult(
        run_dir=run_dir, model_path=model_path, checkpoint_path=run_dir / CHECKPOINT, log_csv=run_dir / LOG_CSV,
        log_json=run_dir / LOG_JSON, curves_path=run_dir / CURVES, classes=list(run.recipe.classes),
        has_val=run.val is not None, final=dict(run.history[-1]), history=list(run.history),
        best_on_val=run.best, best_model_path=best_path if run.best else None, skipped=dict(run.skipped),
        resumed_from_epoch=start_epoch,
    )
