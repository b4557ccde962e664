"""End-to-end fine-tuning of a pretrained backbone on an image folder (`cnncodes finetune`).

The backbone is any torchvision classifier or timm:NAME (`cnncodes.backbones`); its classifier is replaced.

Defaults follow PyTorch's transfer-learning tutorial: SGD (lr 1e-3, momentum 0.9),
StepLR(7, 0.1), RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation.
The final-epoch model is the one reported and saved; picking an epoch on the validation
split is opt-in (`select_best_on_val`) and labelled optimistic.

Resume is exact: every random choice is a function of (seed, epoch, image), and the
checkpoint holds model, optimizer, scheduler, scaler and RNG states as plain tensors.
Under `torchrun` the same code trains with DistributedDataParallel; rank 0 writes.

Where things live (each module imports only those above it):
    config.py  the options, once: FinetuneConfig (validated), the Recipe derived from it
    lpft.py    LP-FT: a fit-head head checked against the run and folded into its first classifier
    model.py   the network, its new classifier, frozen stages, optimizer, loss
    loop.py    one epoch: train step, data views, per-rank sums, the epoch's log entry
    rundir.py  the run folder: lock, checkpoints, resume checks, RNG state, saved model
    report.py  log.csv, log.json, curves.png and the console lines
    api.py     `finetune` (the API) and the run's orchestration
"""

from __future__ import annotations

from ..lazy import lazy_exports

# name -> submodule. Imported on first use, so the CLI can build its options from
# `config` (torch-free) without importing torch.
_EXPORTS = {
    "OPTIMIZERS": "config", "STAGES": "config", "FinetuneConfig": "config", "Recipe": "config", "parse_freeze": "config",
    "TrainStep": "loop", "evaluate": "loop", "train_epoch": "loop",
    "build_model": "model", "loss_function": "model",
    "determinism": "rundir", "BEST_MODEL": "rundir", "CHECKPOINT": "rundir", "MODEL": "rundir",
    "InitHead": "lpft", "load_init_head": "lpft",
    "FinetuneResult": "api", "finetune": "api", "setup_run": "api",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
