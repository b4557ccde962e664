"""One entry for every backbone source: arch names, weights, building, preprocessing.

An arch is a torchvision name (`resnet50`, `densenet121`; `tv:NAME` too) or `timm:NAME`. A bare
name means torchvision, so caches and heads written before timm support still read.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..data import Preprocessing
from ..errors import CnnCodesError
from ..runtime import file_sha256
from . import _timm, _torchvision
from ._api import RANDOM_INIT_SEED, Backbone, WeightsInfo
from ._fold import fold_batchnorm

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def canonical_arch(arch: str) -> str:
    """`tv:resnet50` -> `resnet50`; `timm:NAME` kept; refuses unknown names, listing the nearest."""
    arch = arch.strip()
    if arch.startswith("tv:"):
        arch = arch[3:]
    if arch.startswith(_timm.PREFIX):
        name = arch.removeprefix(_timm.PREFIX)
        known = _timm.names()
        if name not in known and name.partition(".")[0] not in known:
            raise CnnCodesError(f"unknown timm model '{name}'{_nearest(name, known, 'timm:')}")
        return arch
    if arch not in _torchvision.names():
        raise CnnCodesError(f"unknown arch '{arch}'{_nearest(arch, _torchvision.names(), '')}; "
                            f"`cnncodes archs` lists them; timm models as timm:NAME")
    return arch


def _nearest(name: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    return f"; nearest: {', '.join(prefix + c for c in close)}" if close else ""


def check_arch(arch: str) -> None:
    canonical_arch(arch)


def is_timm(arch: str) -> bool:
    return arch.startswith(_timm.PREFIX)


def weights_enum_names(arch: str) -> list[str]:
    arch = canonical_arch(arch)
    return ["DEFAULT"] if is_timm(arch) else _torchvision.weights_enum_names(arch)


def resolve_weights(arch: str, weights: str | None) -> WeightsInfo:
    """Classify a `--weights` value without loading it (cheap: hashes a file at most)."""
    arch = canonical_arch(arch)
    if weights is None or weights.lower() == "none":
        return WeightsInfo("none", "none")
    if os.sep in weights or weights.endswith(WEIGHT_FILE_SUFFIXES) or Path(weights).is_file():
        path = Path(weights)
        if path.is_dir():
            raise CnnCodesError(f"{path}: a folder, not a weights file; pass the state_dict file inside it, a weights name, or 'none'")
        if not path.is_file():
            raise CnnCodesError(f"{path}: weights file not found; pass an existing state_dict file, a weights name, or 'none'")
        return WeightsInfo("file", str(path), file_sha256(path))
    if is_timm(arch):
        if weights not in ("DEFAULT", "timm"):
            raise CnnCodesError(f"unknown weights '{weights}' for {arch}; use DEFAULT (timm's pretrained tag; "
                                f"pick another tag as --arch timm:NAME.TAG), a local .safetensors/.pth file, or 'none'")
        return _timm.resolve_default(arch.removeprefix(_timm.PREFIX))
    info = _torchvision.resolve_enum(arch, weights)
    if info is None:
        raise CnnCodesError(f"unknown weights '{weights}' for {arch}; use one of "
                            f"{', '.join(_torchvision.weights_enum_names(arch))}, a path to a state_dict file, or 'none'")
    return info


def create_backbone(arch: str, weights: str | WeightsInfo | None, num_classes: int | None = None) -> Backbone:
    """The full classification model of `arch` with its weights, wrapped with its head API.

    With `num_classes`, the classifier is replaced by a fresh one of that size (fine-tuning),
    initialised from the same seeded stream as the model, so runs are reproducible.
    """
    arch = canonical_arch(arch)
    info = weights if isinstance(weights, WeightsInfo) else resolve_weights(arch, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        bb = (_timm if is_timm(arch) else _torchvision).build(arch, info)
        if num_classes is not None:
            bb.reset_classifier(num_classes)
    return bb


def create_model(arch: str, weights: str | WeightsInfo | None,
                 num_classes: int | None = None) -> tuple[nn.Module, WeightsInfo]:
    """The model with its weights; with `num_classes`, a fresh classifier of that size (fine-tuning)."""
    bb = create_backbone(arch, weights, num_classes)
    return bb.model, bb.info


def create_extractor(arch: str, weights: str | WeightsInfo | None, fold_bn: bool = True, layers: str = "",
                     log: Callable[[str], None] | None = None) -> tuple[nn.Module, WeightsInfo, int]:
    """Headless model in eval mode with frozen parameters, its weights info and code dim.

    BatchNorm is frozen (eval mode) and, with `fold_bn`, folded into the preceding convolutions
    where torch.fx can trace the model (the same function with fewer memory passes); where it
    cannot, `log` says so. With `layers`, the codes are pooled intermediate activations.
    """
    bb = create_backbone(arch, weights)
    if layers:
        from ._layers import layer_extractor

        model, dim = layer_extractor(bb, layers)
        return model.eval().requires_grad_(False), bb.info, dim
    model = bb.headless().eval().requires_grad_(False)
    if fold_bn:
        model = fold_batchnorm(model, bb.arch, log, inplace=True)  # the model was built for this: no copy
    return model, bb.info, bb.num_features


def default_preprocessing(arch: str, info: WeightsInfo) -> Preprocessing:
    """The weights' own eval transforms (e.g. 342/299 bilinear for inception_v3, 320/300 bicubic
    for efficientnet_b3). A torchvision file takes the transforms of the published weights it is
    (same sha256) or else the arch's original recipe (IMAGENET1K_V1's: 256/224 bilinear for
    the ResNets and MobileNets); `none` takes DEFAULT's; timm: the model's pretrained config."""
    arch = canonical_arch(arch)
    fields = _timm.preprocessing_fields(arch) if is_timm(arch) else _torchvision.preprocessing_fields(arch, info)
    return Preprocessing(**fields)


def fixed_size(arch: str, info: WeightsInfo) -> int | None:
    """The only crop the arch takes (ViT/MaxViT: a fixed patch grid), or None when any size works."""
    arch = canonical_arch(arch)
    if is_timm(arch):
        cfg = _timm.pretrained_cfg(arch.removeprefix(_timm.PREFIX))
        return int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") else None
    if arch.startswith(("vit_", "maxvit")):
        return int(_torchvision.enum_member(info, arch).meta["min_size"][0])
    return None


def resolve_preprocessing(arch: str, info: WeightsInfo, image_size: int | None = None,
                          like: str | None = None, log: Callable[[str], None] | None = None) -> Preprocessing:
    """Precedence as timm's: `image_size` override > the weights' preprocessing > the arch's default.

    `like` names the weights whose preprocessing a local file or `none` follows (`IMAGENET1K_V1`,
    `DEFAULT`), instead of `default_preprocessing`'s rule; for a file, `log` is told which recipe
    it got and how to change it. The override keeps the weights' resize/crop ratio; an arch with
    a fixed input size refuses it.
    """
    if like:
        if info.kind in ("torchvision", "timm"):
            raise CnnCodesError("--preprocess-like applies to --weights FILE or none; named weights bring their own")
        followed = resolve_weights(arch, like)
    else:
        followed = info
    pre = default_preprocessing(arch, followed)
    if log and info.kind == "file":
        log(f"note: {preprocessing_note(arch, info, pre, like)}")
    if not image_size or image_size == pre.crop:
        return pre
    fixed = fixed_size(arch, followed)
    if fixed is not None and image_size != fixed:
        raise CnnCodesError(f"--image-size {image_size}: {arch} takes only {fixed}x{fixed} inputs (a fixed patch grid); "
                            f"drop --image-size or pick an arch that takes any size")
    return Preprocessing.for_image_size(image_size, pre)


def preprocessing_note(arch: str, info: WeightsInfo, pre: Preprocessing, like: str | None = None) -> str:
    """Which preprocessing a weights file gets and why, with the option that changes it."""
    arch = canonical_arch(arch)
    recipe = f"resize {pre.resize}, crop {pre.crop}, {pre.interpolation}"
    name = Path(info.name).name
    if like:
        return f"{name}: preprocessing of {arch} {like} ({recipe}), as --preprocess-like says"
    if is_timm(arch):
        why = f"timm's pretrained config of {arch.removeprefix(_timm.PREFIX)}"
    else:
        member, matched = _torchvision.file_member(arch, info.sha256)
        why = (f"it is torchvision's {type(member).__name__}.{member.name} (sha256 matches), so its transforms"
               if matched else
               f"not a torchvision weights file (no sha256 match), so {arch}'s original eval recipe, {member.name}'s")
    return f"{name}: preprocessing: {why} ({recipe}); another with --preprocess-like NAME (e.g. DEFAULT)"


def parse_layers(arch: str, layers: str | list[str] | None) -> str:
    """`--layer A,B` as the cache records it ("A,B"; "" = the classifier's input). Names are checked on build."""
    if not layers:
        return ""
    names = layers.split(",") if isinstance(layers, str) else list(layers)
    names = [n.strip() for n in names if n.strip()]
    if len(set(names)) != len(names):
        raise CnnCodesError(f"--layer {','.join(names)}: a layer is named twice")
    return ",".join(names)


def list_layers(arch: str) -> list[str]:
    """The intermediate layer names `--layer` accepts for `arch`."""
    from ._layers import layer_names

    return layer_names(create_backbone(arch, "none"))


def code_dim(arch: str) -> int:
    arch = canonical_arch(arch)
    return _timm.code_dim(arch) if is_timm(arch) else _torchvision.code_dim(arch)


def stock_mismatch(arch: str) -> str | None:
    """Why a classifier saved from `arch` loads strictly into the stock architecture yet computes
    something else there (SqueezeNet: a ReLU after the classifier conv, which no state_dict can
    remove), or None where the stock model is the same function."""
    arch = canonical_arch(arch)
    extras = () if is_timm(arch) else _torchvision.stock_extras(arch)
    if not extras:
        return None
    names = ", ".join(f"{n} ({t})" for n, t in extras)
    return (f"torchvision's {arch} runs {names} after its classifier conv, which cnncodes replaces by nn.Identity; "
            f"a state_dict cannot remove it, so a stock get_model('{arch}', num_classes=K) loads the file strictly "
            f"but clips the logits below zero")


def stock_loader_steps(arch: str) -> list[str]:
    """What a loader of a saved `arch` classifier must do after `load_state_dict` to get its function."""
    arch = canonical_arch(arch)
    extras = () if is_timm(arch) else _torchvision.stock_extras(arch)
    return [f"replace module {n} ({t}) with torch.nn.Identity()" for n, t in extras]


def weights_cached(arch: str) -> bool:
    arch = canonical_arch(arch)
    return _timm.cached_offline(arch) if is_timm(arch) else _torchvision.cached_offline(arch)
