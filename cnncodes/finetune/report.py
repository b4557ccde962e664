"""What a run tells: log.csv and log.json (rewritten from the history), curves.png, the console lines."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .. import data, runtime
from .loop import Run
from .rundir import LOG_CSV, LOG_JSON

CSV_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "train_images", "val_loss", "val_acc", "val_images",
              "images_per_s", "train_time_s", "epoch_time_s", "skipped_files")


def write_logs(run: Run, run_dir: Path, layout: data.FolderLayout, final: bool = False) -> None:
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
    runtime.save_figure(fig, path, dpi=100)


def epoch_line(entry: dict, epochs: int) -> str:
    if entry["epoch"] == 0:
        parts = [f"epoch 0/{epochs} (initial model, before any step)"]
    else:
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


def final_lines(run: Run, model_path: Path, best_path: Path | None) -> list[str]:
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
