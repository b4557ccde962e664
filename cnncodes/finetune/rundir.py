"""The run folder: its outputs, checkpoints (plain tensors), resume checks, RNG state, determinism, the saved model.

A checkpoint is written after every epoch and holds everything an exact resume needs; the
Recipe in it must match the new run's, except `RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .. import classifier, data, distributed, runtime
from ..errors import CnnCodesError
from .config import RESUMABLE_CHANGES, Recipe
from .loop import Run

CHECKPOINT_FORMAT = "cnncodes-finetune-checkpoint"
CHECKPOINT, LOG_CSV, LOG_JSON, CURVES = "checkpoint.pt", "log.csv", "log.json", "curves.png"
MODEL, BEST_MODEL = "model.pt", "model_best_on_val.pt"
OUTPUTS = (CHECKPOINT, LOG_CSV, LOG_JSON, CURVES, MODEL, "model.json", BEST_MODEL, "model_best_on_val.json")


def run_dir_problem(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
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


def load_checkpoint(path: Path) -> dict:
    """A cnncodes checkpoint read with weights_only=True, or one clear error naming the fix."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own message would advise weights_only=False: never
        raise CnnCodesError(f"{path}: refused: the checkpoint holds pickled Python objects, not only tensors "
                            f"(loading it could run code); pass --overwrite to start over") from e
    except Exception as e:
        raise CnnCodesError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"pass --overwrite to start over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CnnCodesError(f"{path}: not a cnncodes fine-tuning checkpoint; pass --overwrite to start over")
    return ckpt


def resume_problem(ckpt: dict, recipe: Recipe) -> str | None:
    """Why `recipe` may not continue `ckpt` (None: fine): any Recipe difference but `RESUMABLE_CHANGES`."""
    saved, now = ckpt["recipe"], recipe.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
             if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diffs:
        return ("--resume with different settings than the checkpoint (" + "; ".join(diffs) +
                "); rerun with the original options, or pass --overwrite to start over")
    if ckpt["epoch"] > recipe.epochs:
        return f"--epochs {recipe.epochs} is below the {ckpt['epoch']} epochs already trained; pass --epochs >= {ckpt['epoch']}"
    return None


def checkpoint_state(run: Run, epoch: int) -> dict:
    """Everything an exact resume after `epoch` needs, as plain tensors and Python values."""
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


def restore(run: Run, ckpt: dict) -> int:
    """Load a checkpoint's states into `run`; returns the number of finished epochs."""
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


def save_model(run: Run, path: Path, layout: data.FolderLayout, selected: str) -> None:
    """The classifier (model.pt + model.json) with where it came from and which epoch it is."""
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


def claim(stack: contextlib.ExitStack, run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool,
          device: torch.device) -> dict | None:
    """Lock `run_dir` (rank 0, held until `stack` closes), check it may be used as asked, and return
    the checkpoint to resume from (every rank) or None. Rank 0's refusal is raised on every rank."""
    ckpt, problem = None, None
    if distributed.is_main():
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise CnnCodesError(f"{run_dir}: exists and is not a folder; pass -o a new or existing run folder")
            stack.enter_context(runtime.FileLock(run_dir / "run", f"run folder {run_dir}"))
            problem = run_dir_problem(run_dir, resume, overwrite)
            if problem is None and resume and (run_dir / CHECKPOINT).exists():
                ckpt = load_checkpoint(run_dir / CHECKPOINT)
                problem = resume_problem(ckpt, recipe)
        except CnnCodesError as e:
            problem = str(e)
        except OSError as e:
            problem = f"{run_dir}: cannot use as run folder ({e.strerror or e}); check the path and its permissions"
    distributed.share_error(problem, device)
    if not distributed.is_main() and resume and (run_dir / CHECKPOINT).exists():
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
    return ckpt
