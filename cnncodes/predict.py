"""Predict with a head (.h5 from `fit-head`) or a classifier (.pt from `finetune`/`export`); export heads.

A head becomes a plain classifier of its arch by folding its standardiser and weights into
the backbone's final classification layer (`head_to_model`): `predict` runs that model, and `export` saves it with
`classifier.save_classifier`, so both give the same scores by construction.

The `score` of a prediction is softmax(class scores): a probability for logreg/linear heads
and for fine-tuned classifiers; for svm heads, softmax of the SVM decision scores (a monotone
confidence, not a calibrated probability).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import WeightsInfo, create_backbone, resolve_weights, stock_mismatch
from .data import (
    SPLIT_NAMES,
    ImageFiles,
    Normalize,
    Preprocessing,
    make_loader,
)
from .errors import CnnCodesError
from .folders import image_files
from .heads import LinearHead
from .heads.multi import refuse_fused
from .manifest import ManifestOptions, is_manifest, read_manifest
from .predictions import Predictions
from .runtime import (
    autocast,
    check_precision,
    configure_threads,
    inference_batch_size,
    resolve_device,
)
from .store import HDF5_SIGNATURE


@dataclass
class Model:
    """A ready-to-run classifier: torchvision model, class names, eval preprocessing."""

    module: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    arch: str
    kind: str  # "head" or "classifier"
    precision: str = "fp32"  # what the codes of a head were extracted with
    source: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- heads -> torchvision models


def head_weights(head: LinearHead, weights: str | None) -> WeightsInfo:
    """Resolve the backbone weights for a head, refusing weights other than those it was trained on."""
    arch, identity, name = head.meta.get("arch"), head.meta.get("weights"), head.meta.get("weights_name")
    if not arch or not identity:
        raise CnnCodesError("head file does not record its backbone (arch/weights attributes); re-fit it with `cnncodes fit-head`")
    if weights is None:
        if identity.startswith("file:") and not Path(name).is_file():
            raise CnnCodesError(f"head was trained on codes of weights file {name} ({identity}), which is not there; "
                                f"pass --weights PATH to a copy of it")
        weights = name
    info = resolve_weights(arch, weights)
    if info.identity != identity:
        raise CnnCodesError(f"head was trained on codes of weights {name} ({identity}), you gave {weights} "
                            f"({info.identity}); pass the weights the cache was extracted with")
    return info


def head_to_model(head: LinearHead, weights: str | None = None) -> nn.Module:
    """The head's backbone with its classifier = the head (standardiser folded in), in eval mode."""
    refuse_fused(head.meta, "predict/export")
    if head.meta.get("layers"):
        raise CnnCodesError(f"head was trained on codes of intermediate layers ({head.meta['layers']}), which no "
                            f"classifier of {head.meta['arch']} can take; predict and export need a head fitted on "
                            f"a cache extracted without --layer")
    info = head_weights(head, weights)
    bb = create_backbone(head.meta["arch"], info)
    if bb.num_features != head.n_features:
        raise CnnCodesError(f"head expects {head.n_features}-d codes but {head.meta['arch']} gives {bb.num_features}-d")
    w, b = head.folded()
    return bb.set_classifier(torch.from_numpy(w), torch.from_numpy(b)).eval()


def is_head_file(path: str | Path) -> bool:
    """An .h5/.hdf5 name or the HDF5 signature: heads are HDF5, classifiers are torch .pt files."""
    if Path(path).suffix.lower() in (".h5", ".hdf5"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def load_model(path: str | Path, weights: str | None = None) -> Model:
    """A head (.h5, with its backbone) or a saved classifier (.pt + .json), ready to predict."""
    from .classifier import load_classifier, meta_preprocessing

    path = resolve_model_path(path)
    if is_head_file(path):
        head = LinearHead.load(path)
        return Model(head_to_model(head, weights), head.classes, Preprocessing.from_dict(head.meta["preprocessing"]),
                     head.meta["arch"], "head", head.meta.get("precision", "fp32"),
                     {"head": str(path), "clf": head.clf, "C": head.C, "weights": head.meta["weights"]})
    if weights is not None:
        raise CnnCodesError(f"{path}: --weights applies to heads (.h5); a classifier .pt carries its own weights")
    module, meta = load_classifier(path)
    return Model(module, list(meta["classes"]), meta_preprocessing(meta), meta["arch"], "classifier", "fp32",
                 meta.get("source", {}))


def resolve_model_path(path: str | Path) -> Path:
    """A model argument -> the file to load: a fine-tuning run folder gives its final model.pt;
    a run's JSON metadata or checkpoint gets an error that says what the file is."""
    from .classifier import FORMAT
    from .finetune.rundir import BEST_MODEL, CHECKPOINT, MODEL

    path = Path(path)
    use = f"pass the run folder or its {MODEL}"
    if path.is_dir():
        if (path / MODEL).is_file():
            return path / MODEL
        unfinished = f"only {CHECKPOINT}: the run is unfinished; rerun it with --resume" if (path / CHECKPOINT).is_file() else ""
        raise CnnCodesError(f"{path}: a folder without {MODEL}, so not a finished `cnncodes finetune` run "
                            f"({unfinished or 'pass a run folder, a head .h5 or a classifier .pt'})")
    if not path.is_file():
        raise CnnCodesError(f"{path}: no such file; pass a head from `cnncodes fit-head`, a classifier .pt or a finetune run folder")
    if path.suffix.lower() == ".json":
        try:
            is_meta = json.loads(path.read_text()).get("format") == FORMAT
        except (ValueError, OSError, AttributeError, UnicodeDecodeError):
            is_meta = False
        if is_meta:
            raise CnnCodesError(f"{path} is the metadata (class names, preprocessing) of the classifier "
                                f"{path.with_suffix('.pt').name}; {use}, or {path.with_suffix('.pt')}")
        raise CnnCodesError(f"{path}: a JSON file, not a model; pass a head .h5, a classifier .pt or a finetune run folder")
    if path.name == CHECKPOINT:
        raise CnnCodesError(f"{path} is a fine-tuning checkpoint (to --resume the run), not a classifier; {use} "
                            f"(or {BEST_MODEL} with --select-best-on-val)")
    return path


def export_head(head_path: str | Path, out: str | Path, weights: str | None = None) -> Path:
    """Fold a head into its backbone and save a classifier (state_dict + JSON) with `save_classifier`."""
    from .classifier import ensure_pt_suffix, save_classifier

    if not is_head_file(head_path):
        raise CnnCodesError(f"{head_path}: not a head file (.h5 from `cnncodes fit-head`); a classifier .pt needs no export")
    head = LinearHead.load(head_path)
    refuse_fused(head.meta, "export")
    arch = head.meta.get("arch")
    mismatch = arch and stock_mismatch(arch)
    if mismatch:  # an export exists to be loaded by plain torchvision; there it would give other scores
        raise CnnCodesError(f"{head_path}: export refused: {mismatch}; predict with the head itself "
                            f"(cnncodes predict {head_path} IMAGES), which runs the exact model")
    module = head_to_model(head, weights)
    out = ensure_pt_suffix(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"from": "head", "head": str(head_path), "clf": head.clf, "C": head.C, "weights": head.meta["weights"],
              "weights_name": head.meta["weights_name"], "precision": head.meta.get("precision", "fp32")}
    save_classifier(module, out, head.meta["arch"], head.classes, Preprocessing.from_dict(head.meta["preprocessing"]), source)
    return out


# --------------------------------------------------------------------------- running a model over files


@torch.inference_mode()
def run_model(module: nn.Module, root: str | Path, paths: Sequence[str], pre: Preprocessing, *,
              device: str | torch.device = "auto", precision: str = "fp32", batch_size: int | None = None,
              workers: int | None = None, channels_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
    """Yield (indices, float32 outputs, [(index, reason) of bad files]) per batch of `paths` under `root`.

    Reuses the extraction plumbing: `ImageFiles` (bad files reported, never raised),
    `make_loader`, on-device `Normalize` and `autocast`.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    check_precision(precision, dev)
    configure_threads(dev)
    batch_size = batch_size or inference_batch_size(dev)
    module = module.to(dev).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    normalize = Normalize(pre.mean, pre.std, channels_last).to(dev)
    dataset = ImageFiles(root, paths, pre.load, lambda img, _: pre.eval_view(img))
    loader = make_loader(dataset, batch_size, workers, dev)
    for batch in loader:
        out = np.zeros((0, 0), np.float32)
        if len(batch.indices):
            with autocast(dev, precision):
                out = module(normalize(batch.images.to(dev, non_blocking=True))).float().cpu().numpy()
        yield batch.indices.numpy(), out, batch.failed


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One input image: its path, how to show it, and its true class when the folder says so."""

    path: Path
    name: str
    true: str | None = None
    split: str | None = None


def collect_inputs(inputs: Sequence[str | Path], classes: Sequence[str],
                   manifest: ManifestOptions | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Image files, folders and CSV manifests -> items (+ (path, reason) for inputs that are not usable).

    In a folder, an image whose parent folder is named like a class of the model is
    labelled with it (DIR/<class>/x.jpg, DIR/val/<class>/x.jpg, or DIR = <class>); a
    first-level folder named train/val/test is recorded as its split (accuracy per split).
    Files with non-image extensions are skipped and reported. A .csv is a manifest read
    with `manifest` options: its rows keep their path as written, label and split (if any).
    """
    items, skipped = [], []
    known = set(classes)
    for given in inputs:
        p = Path(given)
        if is_manifest(p):
            _manifest_items(p, manifest, items, skipped)
        elif p.is_file():
            items.append(Item(p, str(p)))
        elif p.is_dir():
            for f in _walk_images(p, skipped):
                rel = f.relative_to(p)
                true = f.parent.name if f.parent.name in known else None
                split = rel.parts[0] if len(rel.parts) > 2 and rel.parts[0].lower() in SPLIT_NAMES else None
                items.append(Item(f, str(f), true, split))
        else:
            skipped.append((str(p), "no such file or folder"))
    return items, skipped


def _manifest_items(path: Path, options: ManifestOptions | None, items: list[Item], skipped: list) -> None:
    """A manifest's rows as items (labels optional); a missing file is skipped with its line."""
    m = read_manifest(path, options, require_labels=False)
    split_col = m.record["splits_from"] == "column"
    for r in m.rows:
        f = m.root / r.path
        if not f.exists():
            skipped.append((r.path, f"no such file ({path.name} line {r.line})"))
            continue
        items.append(Item(f, r.path, r.label or None, r.split if split_col else None))


def _walk_images(folder: Path, skipped: list) -> list[Path]:
    """The folder's images as `extract` finds them (`folders.image_files`); the rest skipped with a reason."""
    ignored: list[tuple[str, str]] = []
    images = image_files(folder, ignored, folder)
    skipped += [(str(folder / rel), reason) for rel, reason in ignored]
    return images


# --------------------------------------------------------------------------- predict


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def predict(model_path: str | Path, inputs: Sequence[str | Path], *, weights: str | None = None, device: str = "auto",
            precision: str | None = None, batch_size: int | None = None, workers: int | None = None,
            manifest: ManifestOptions | None = None, note: Callable[[str], None] = _to_stderr) -> Predictions:
    """Classify image files, folders and/or CSV manifests (read with `manifest` options) with a
    head or a classifier (see the module docstring).

    precision: None = the head's extraction precision (fp32 for classifiers; fp32, with a `note`,
    where that was fp16 and the device is not CUDA).
    """
    if (batch_size is not None and batch_size < 1) or (workers is not None and workers < 0):
        raise CnnCodesError("--batch-size must be >= 1 and --workers >= 0")
    model = load_model(model_path, weights)
    items, skipped = collect_inputs(inputs, model.classes, manifest)
    if not items:
        raise CnnCodesError("no images to predict: pass image files or folders holding images"
                            + (f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    dev = resolve_device(device)
    if precision is None:
        precision = model.precision
        if precision == "fp16" and dev.type != "cuda":  # asked for explicitly, it is refused (check_precision)
            precision = "fp32"
            note(f"note: {model_path}'s codes were extracted in fp16, which runs on CUDA only; predicting in fp32 "
                 f"on {dev.type} (fp16 approximates fp32 more closely than bf16 does); --precision bf16 is faster")
    scores = np.full((len(items), len(model.classes)), np.nan, np.float32)
    ok = np.zeros(len(items), bool)
    for idx, out, failed in run_model(model.module, "/", [str(i.path.resolve()) for i in items], model.preprocessing,
                                      device=dev, precision=precision, batch_size=batch_size, workers=workers):
        if len(idx):  # a batch of unreadable files only has no scores
            scores[idx], ok[idx] = out, True
        skipped += [(items[i].name, reason) for i, reason in failed]
    if not ok.any():
        path, reason = skipped[0]
        raise CnnCodesError(f"no readable images among the {len(items)} given (e.g. {path}: {reason}); "
                            f"pass image files or folders of images")
    return _predictions(items, ok, scores, skipped, model.classes)


def _predictions(items: list[Item], ok: np.ndarray, scores: np.ndarray, skipped, classes: list[str]) -> Predictions:
    good = np.flatnonzero(ok)
    preds = Predictions([], skipped, classes, scores[good], [items[i].path for i in good])
    preds.rows += [{"path": items[i].name, "pred": classes[int(p.argmax())], "score": float(p.max()),
                    "true": items[i].true, "split": items[i].split} for i, p in zip(good, preds.probabilities())]
    return preds
