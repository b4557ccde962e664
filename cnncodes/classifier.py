"""The saved-classifier format shared by `finetune`, `export` and `predict`.

A classifier is two files: `NAME.pt`, a plain state_dict of the arch with a C-class classifier
(torchvision: `torchvision.models.get_model(arch, num_classes=C)` loads it strictly; timm:
`timm.create_model(NAME, num_classes=C)`), and `NAME.json` beside it with the arch, class
names, preprocessing, where the weights came from, and `load_steps`: what a loader must do
after `load_state_dict` (SqueezeNet: its classifier conv is followed by no ReLU here). No pickle: the
state_dict is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .backbones import create_backbone, load_state_file, stock_loader_steps
from .data import Preprocessing
from .errors import CnnCodesError
from .runtime import atomic_path, save_torch_atomic

FORMAT = "cnncodes-classifier"


def meta_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_classifier(model: nn.Module, path: str | Path, arch: str, classes: list[str],
                    preprocessing: Preprocessing, source: dict) -> None:
    """Write `path` (state_dict) and its JSON sidecar, each atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": 1,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "source": source,
        "load_steps": stock_loader_steps(arch),  # [] where get_model + load_state_dict is the whole model
    }
    save_torch_atomic(state, path)
    with atomic_path(meta_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def read_classifier_meta(path: str | Path) -> dict:
    side = meta_path(path)
    if not side.is_file():
        raise CnnCodesError(f"{path}: no {side.name} beside it; a cnncodes classifier is NAME.pt plus NAME.json")
    try:
        meta = json.loads(side.read_text())
    except (ValueError, OSError) as e:
        raise CnnCodesError(f"{side}: not a readable cnncodes classifier description ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CnnCodesError(f"{side}: not a cnncodes classifier description (format field missing)")
    classes, n = meta.get("classes"), meta.get("num_classes")
    if not (isinstance(meta.get("arch"), str) and isinstance(meta.get("preprocessing"), dict) and isinstance(n, int)
            and isinstance(classes, list) and len(classes) == n and all(isinstance(c, str) for c in classes)):
        raise CnnCodesError(f"{side}: damaged classifier description (needs arch, preprocessing, and num_classes "
                            f"equal to the number of class names); export or fine-tune the model again")
    return meta


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """The classifier as a model in eval mode, and its metadata."""
    meta = read_classifier_meta(path)
    arch = meta["arch"]
    model = create_backbone(arch, "none").reset_classifier(int(meta["num_classes"]))
    state = load_state_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CnnCodesError(f"{path}: state_dict does not match {arch} with {meta['num_classes']} classes ({str(e).splitlines()[0]})") from e
    return model.eval(), meta


def meta_preprocessing(meta: dict) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])


def ensure_pt_suffix(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".pt" else path.with_suffix(".pt")

