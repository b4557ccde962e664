"""What `predict` found (`Predictions`) and its outputs: the CSV or JSON file, the grid of images."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.special

from .errors import CnnCodesError
from .runtime import check_replaceable, save_figure


@dataclass
class Predictions:
    """What `predict` found: one row per usable image, skipped inputs, accuracy when labelled."""

    rows: list[dict]
    skipped: list[tuple[str, str]]
    classes: list[str]
    scores: np.ndarray  # (n, K) raw class scores (logits / decision scores), rows order
    files: list[Path] = field(default_factory=list)  # each row's image file (rows show paths as given)

    def probabilities(self) -> np.ndarray:
        """(n, K) softmax of the class scores, rows order: what `score` is the largest of."""
        return scipy.special.softmax(self.scores.astype(np.float64), axis=1)

    def accuracy(self) -> dict[str, dict]:
        """{"all" or split: {"accuracy", "correct", "images"}} over images with a known class."""
        groups: dict[str, list[dict]] = {}
        for r in self.rows:
            if r["true"] is not None:
                groups.setdefault("all", []).append(r)
                if r["split"]:
                    groups.setdefault(r["split"], []).append(r)
        if len({r["split"] for r in groups.get("all", [])}) <= 1:
            groups = {"all": groups["all"]} if "all" in groups else {}
        return {k: {"accuracy": sum(r["pred"] == r["true"] for r in v) / len(v),
                    "correct": sum(r["pred"] == r["true"] for r in v), "images": len(v)} for k, v in groups.items()}


PREDICTION_SUFFIXES = (".csv", ".json")
CSV_HEADER = ("path", "pred", "score", "true")
SCORE_PREFIX = "score:"  # a class column named like a fixed column (a class "path", say) gets this prefix


def score_columns(classes: Sequence[str]) -> list[str]:
    """The CSV's per-class probability columns (`--scores`): each named by its class."""
    return [f"{SCORE_PREFIX}{c}" if c in CSV_HEADER else c for c in classes]


def check_predictions_path(out: str | Path, inputs: Sequence[str | Path] = ()) -> None:
    """A predictions file is .csv or .json and replaces only an earlier predictions file: never an
    input (a manifest), a head, a cache or anything else."""
    if Path(out).suffix.lower() not in PREDICTION_SUFFIXES:
        raise CnnCodesError(f"{out}: predictions are written as .csv or .json; name the file with one of those")
    check_replaceable(out, "predictions file", _holds_predictions, inputs)


def _holds_predictions(path: Path) -> bool:
    """A CSV that starts with our header, or a JSON object with our "predictions" key."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":  # our header, or it followed by class columns (--scores)
                first, ours = f.readline().rstrip("\r\n"), ",".join(CSV_HEADER)
                return first == ours or first.startswith(ours + ",")
            return "predictions" in json.load(f)
    except (OSError, ValueError, TypeError):  # unreadable, not UTF-8 or not JSON: not ours
        return False


def write_predictions(preds: Predictions, out: str | Path, scores: bool = False) -> None:
    """CSV (path, pred, score, true) or JSON (classes, rows, skipped, accuracy) by the file suffix.

    scores: also every class's probability (`Predictions.probabilities`), as torchvision/timm
    inference scripts give: one column per class after `true` in CSV (`score_columns`), a
    {class: probability} dict "scores" per row in JSON.
    """
    check_predictions_path(out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    probs = preds.probabilities() if scores else np.zeros((len(preds.rows), 0))
    if out.suffix.lower() == ".json":
        rows = [{**r, "scores": dict(zip(preds.classes, map(float, p)))} if scores else r
                for r, p in zip(preds.rows, probs)]
        out.write_text(json.dumps({"classes": preds.classes, "predictions": rows,
                                   "skipped": [{"path": p, "reason": r} for p, r in preds.skipped],
                                   "accuracy": preds.accuracy()}, indent=2))
        return
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_HEADER, *(score_columns(preds.classes) if scores else [])])
        for r, p in zip(preds.rows, probs):
            writer.writerow([r["path"], r["pred"], f"{r['score']:.6f}", r["true"] or "", *(f"{v:.6g}" for v in p)])


def draw_grid(preds: Predictions, out: str | Path, n: int = 16, seed: int = 0) -> Path:
    """A grid of a random sample of images titled with predicted (and true) class; wrong in red.

    Wrong predictions are drawn first (up to half the grid), so the mistakes are always on it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .data import BadImage, load_rgb

    rows = preds.rows
    rng = np.random.default_rng(seed)
    wrong = [i for i, r in enumerate(rows) if r["true"] is not None and r["true"] != r["pred"]]
    pick = rng.permutation(wrong)[: n // 2].tolist()
    rest = [i for i in range(len(rows)) if i not in set(pick)]
    pick = sorted(pick + rng.permutation(rest)[: min(n, len(rows)) - len(pick)].tolist())
    cols = min(4, len(pick))
    lines = int(np.ceil(len(pick) / cols))
    fig = Figure(figsize=(3 * cols, 3.2 * lines))
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), pick):
        r = rows[i]
        try:
            img = load_rgb(preds.files[i], 256)  # the file itself: a manifest's paths are relative to it
            img.thumbnail((256, 256))
            ax.imshow(img)
        except BadImage:
            pass
        title = f"pred: {r['pred']} ({r['score']:.2f})" + (f"\ntrue: {r['true']}" if r["true"] else "")
        wrong = r["true"] is not None and r["true"] != r["pred"]
        ax.set_title(title, fontsize=9, color="red" if wrong else "black")
    fig.tight_layout()
    return save_figure(fig, out, dpi=80)
