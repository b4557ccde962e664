"""ResNet backbones: a registry, weight loading (torchvision enum, local file, none), headless models.

Follows timm's split: `forward_features` gives the pooled penultimate-layer codes,
`forward_head` the classifier, so a frozen extractor and a fine-tuned model share code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from .data import Preprocessing
from .errors import CnnCodesError

ARCHS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
    "resnet152": (torchvision.models.resnet152, "ResNet152_Weights"),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2, "Wide_ResNet50_2_Weights"),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, "ResNeXt50_32X4D_Weights"),
}
RANDOM_INIT_SEED = 0  # `--weights none` is seeded so reruns and resumes give the same codes


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, recorded in caches and heads."""

    kind: str  # "torchvision" | "file" | "none"
    name: str  # enum name, file name, or "none"
    sha256: str = ""  # of the file, for kind == "file"

    @property
    def identity(self) -> str:
        if self.kind == "file":
            return f"file:sha256:{self.sha256}"
        if self.kind == "torchvision":
            return f"torchvision:{self.name}"
        return f"none:seed{RANDOM_INIT_SEED}"


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise CnnCodesError(f"unknown arch '{arch}'; choose one of: {', '.join(ARCHS)}")


def weights_enum_names(arch: str) -> list[str]:
    check_arch(arch)
    enum = getattr(torchvision.models, ARCHS[arch][1])
    return ["DEFAULT"] + [w.name for w in enum]


def resolve_weights(arch: str, weights: str | None) -> WeightsInfo:
    """Classify a `--weights` value without loading it (cheap: hashes a file at most)."""
    check_arch(arch)
    if weights is None or weights.lower() == "none":
        return WeightsInfo("none", "none")
    if os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(weights).is_file():
        path = Path(weights)
        if not path.is_file():
            raise CnnCodesError(f"{path}: weights file not found; pass an existing state_dict file, a torchvision weights name, or 'none'")
        return WeightsInfo("file", str(path), _sha256(path))
    enum_name = weights.split(".")[-1]
    names = weights_enum_names(arch)
    if enum_name not in names:
        raise CnnCodesError(
            f"unknown weights '{weights}' for {arch}; use one of {', '.join(names)}, a path to a state_dict file, or 'none'"
        )
    enum = getattr(torchvision.models, ARCHS[arch][1])
    member = enum.DEFAULT if enum_name == "DEFAULT" else enum[enum_name]
    return WeightsInfo("torchvision", f"{ARCHS[arch][1]}.{member.name}")


def default_preprocessing(arch: str, info: WeightsInfo) -> Preprocessing:
    """The weights' own eval transforms (e.g. resize 232 for ResNet50 V2), else the ImageNet 256/224."""
    if info.kind != "torchvision":
        return Preprocessing()
    enum_cls, member = info.name.split(".")
    t = getattr(torchvision.models, enum_cls)[member].transforms()
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return Preprocessing(
        resize=int(resize),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )


def create_model(arch: str, weights: str | WeightsInfo | None,
                 num_classes: int | None = None) -> tuple[nn.Module, WeightsInfo]:
    """A torchvision ResNet with the given weights loaded (fc kept at 1000 classes or resized).

    `weights` is a `--weights` value or an already resolved `WeightsInfo` (which saves
    hashing a weights file a second time). With `num_classes`, the pretrained fc is replaced
    by a fresh `nn.Linear` (fine-tuning); without, the fc from the weights is kept as is.
    """
    info = weights if isinstance(weights, WeightsInfo) else resolve_weights(arch, weights)
    builder = ARCHS[arch][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = builder()
        if info.kind != "none":
            load_backbone_state(model, _read_state_dict(arch, info), arch, info)
        if num_classes is not None:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model, info


def headless(model: nn.Module) -> nn.Module:
    """Drop the classifier so the model returns pooled penultimate codes (N x D)."""
    model.fc = nn.Identity()
    return model


def create_extractor(arch: str, weights: str | WeightsInfo | None, fold_bn: bool = True) -> tuple[nn.Module, WeightsInfo, int]:
    """Headless model in eval mode with frozen parameters, its weights info and code dim.

    BatchNorm is frozen (eval mode) and, with `fold_bn`, folded into the preceding
    convolutions: the same function with fewer memory passes (about 1.5-2x on CPU).
    """
    model, info = create_model(arch, weights)
    dim = model.fc.in_features
    model = headless(model).eval().requires_grad_(False)
    if fold_bn:
        model = fold_batchnorm(model)
    return model, info, dim


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into convolutions (torch.fx); the model as is if untraceable."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model).eval().requires_grad_(False)
    except Exception:  # an exotic variant fx cannot trace: still correct, just unfused
        return model


def load_backbone_state(model: nn.Module, state: dict, arch: str, info: WeightsInfo) -> None:
    """Load every non-fc tensor strictly; fc is loaded too when its shape matches."""
    state = _unwrap_state_dict(state)
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own_body = {k for k in own if not k.startswith("fc.")}
    missing = sorted(own_body - body.keys())
    unexpected = sorted(body.keys() - own_body)
    wrong = sorted(k for k in own_body & body.keys() if tuple(own[k].shape) != tuple(body[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: file {tuple(body[k].shape)} vs {arch} {tuple(own[k].shape)})")
        raise CnnCodesError(
            f"{info.name}: weights do not fit --arch {arch}: keys {'; '.join(parts)}; "
            f"pass the --arch these weights were trained for"
        )
    fc = {k: v for k, v in state.items() if k.startswith("fc.") and k in own and v.shape == own[k].shape}
    model.load_state_dict({**body, **fc}, strict=False)


def _unwrap_state_dict(state) -> dict:
    if not isinstance(state, dict):
        raise CnnCodesError("weights file does not hold a state_dict (a dict of tensors)")
    for key in ("state_dict", "model", "model_state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in tensors.items()}


def load_state_file(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True: a file with arbitrary pickled objects is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CnnCodesError(
            f"{path}: refused: the file holds pickled Python objects, not only tensors "
            f"(loading it could run code); re-save it as a plain state_dict"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CnnCodesError(f"{path}: not a readable PyTorch weights file ({str(e).splitlines()[0]})") from e


def _read_state_dict(arch: str, info: WeightsInfo) -> dict:
    if info.kind == "file":
        return load_state_file(info.name)
    enum_cls, member = info.name.split(".")
    weights = getattr(torchvision.models, enum_cls)[member]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, proxy, corrupt download: one clear message
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise CnnCodesError(
            f"cannot get torchvision weights {info.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"offline? put the file at {hub} (TORCH_HOME), or pass --weights PATH to a local state_dict, "
            f"or --weights none for random weights; names for {arch}: {', '.join(weights_enum_names(arch))}"
        ) from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
