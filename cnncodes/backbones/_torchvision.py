"""torchvision backbones: every name in `list_models(module=torchvision.models)`, built with `get_model`.

Weights come from the arch's own enum (`get_model_weights`); the cached hub file is hash-checked
and read with `weights_only=True` (never `load_state_dict_from_url`, which unpickles).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torchvision
from torch import nn

from ._api import Backbone, WeightsInfo
from ._weights import HASH_IN_NAME, fit_state, hub_file, load_state_file

AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # Inception v3 / GoogLeNet run without auxiliary heads


@functools.cache
def names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def weights_enum(arch: str):
    return torchvision.models.get_model_weights(arch)


def weights_enum_names(arch: str) -> list[str]:
    return ["DEFAULT"] + [w.name for w in weights_enum(arch)]


def enum_member(info: WeightsInfo, arch: str):
    """The weights enum member the preprocessing and build follow: the given one; for a file,
    the member it is (`file_member`); for none, DEFAULT."""
    if info.kind == "torchvision":
        enum_cls, member = info.name.split(".")
        return weights_enum(arch)[member]
    if info.kind == "file":
        return file_member(arch, info.sha256)[0]
    return weights_enum(arch).DEFAULT


def file_member(arch: str, sha256: str) -> tuple[object, bool]:
    """(member, matched): the arch's weights whose published file this is (its sha256 starts with
    the hash prefix in the URL's file name, torch.hub's convention), else the arch's original
    recipe (`original_member`): a converted or trained checkpoint was almost always made with
    the classic resize-256/crop-224 preprocessing, not a later recipe such as V2's 232."""
    for member in weights_enum(arch):
        m = HASH_IN_NAME.search(Path(member.url).name)
        if m and sha256 and sha256.startswith(m.group(1)):
            return member, True
    return original_member(arch), False


def original_member(arch: str):
    """The arch's first ImageNet weights (IMAGENET1K_V1) where torchvision has them, else DEFAULT."""
    enum = weights_enum(arch)
    return enum["IMAGENET1K_V1"] if "IMAGENET1K_V1" in enum.__members__ else enum.DEFAULT


def resolve_enum(arch: str, weights: str) -> WeightsInfo | None:
    """`weights` as a member of the arch's enum (`DEFAULT`, `IMAGENET1K_V1`, `ResNet18_Weights.IMAGENET1K_V1`)."""
    enum = weights_enum(arch)
    enum_name = weights.split(".")[-1]
    if enum_name not in weights_enum_names(arch):
        return None
    member = enum.DEFAULT if enum_name == "DEFAULT" else enum[enum_name]
    return WeightsInfo("torchvision", f"{enum.__name__}.{member.name}")


def build_kwargs(arch: str, info: WeightsInfo) -> dict:
    """What torchvision's builder sets itself when given weights (it is given none here)."""
    member = enum_member(info, arch)
    kw: dict = {}
    if arch in ("googlenet", "inception_v3"):
        kw.update(transform_input=True, aux_logits=False, init_weights=info.kind == "none")
    if arch.startswith("vit_"):
        kw["image_size"] = member.meta["min_size"][0]
    if arch.startswith("maxvit"):
        kw["input_size"] = member.meta["min_size"]
    return kw


def find_classifier(model: nn.Module) -> tuple[str, int, tuple[str, ...]]:
    """(dotted name, code dim, modules that go with it): the last nn.Linear; SqueezeNet's final conv."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        name, layer = linears[-1]
        return name, layer.in_features, ()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    name, conv = convs[-1]  # squeezenet: classifier.1, then ReLU (classifier.2) and pooling
    parent, _, idx = name.rpartition(".")
    return name, conv.in_channels, (f"{parent}.{int(idx) + 1}",)


def build(arch: str, info: WeightsInfo) -> Backbone:
    """The full classifier of `arch` with `info`'s weights (random, seeded by the caller, for none)."""
    member = enum_member(info, arch)
    model = torchvision.models.get_model(arch, weights=None, **build_kwargs(arch, info))
    name, dim, extra = find_classifier(model)
    fixed = member.meta["min_size"][0] if arch.startswith(("vit_", "maxvit")) else None
    bb = Backbone(arch, model, name, dim, info, extra_identity=extra, fixed_size=fixed)
    if info.kind == "torchvision":
        state = load_state_file(hub_file(member.url, f"torchvision weights {info.name}", _hint(arch)))
    elif info.kind == "file":
        state = load_state_file(info.name)
    else:
        return bb
    fit_state(model, state, (name + ".",), arch, info.name, AUX_PREFIXES)
    return bb


def _hint(arch: str) -> str:
    return (f"or pass --weights PATH to a local state_dict, or --weights none for random weights; "
            f"names for {arch}: {', '.join(weights_enum_names(arch))}")


def preprocessing_fields(arch: str, info: WeightsInfo) -> dict:
    """resize, crop, mean, std, interpolation from the weights' own eval transforms (DEFAULT's for file/none)."""
    t = enum_member(info, arch).transforms()
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return {"resize": int(resize), "crop": int(t.crop_size[0]), "mean": tuple(t.mean), "std": tuple(t.std),
            "interpolation": t.interpolation.value}


@functools.cache
def _classifier(arch: str) -> tuple[str, int, tuple[tuple[str, str], ...]]:
    """find_classifier without allocating weights (the model is built on the meta device), with
    the type names of the modules that go with the classifier."""
    kw = build_kwargs(arch, WeightsInfo("none", "none"))
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None, **kw)
    except NotImplementedError:  # a builder computing shapes from tensors (RegNet)
        with empty_weights():
            model = torchvision.models.get_model(arch, weights=None, **kw)
    name, dim, extra = find_classifier(model)
    return name, dim, tuple((e, type(model.get_submodule(e)).__name__) for e in extra)


def code_dim(arch: str) -> int:
    return _classifier(arch)[1]


def stock_extras(arch: str) -> tuple[tuple[str, str], ...]:
    """(name, type) of the modules stock torchvision runs after the classifier and cnncodes
    replaces by nn.Identity (SqueezeNet: classifier.2, a ReLU); () for every other arch."""
    return _classifier(arch)[2]


@contextlib.contextmanager
def empty_weights():
    """Parameters and buffers go to the meta device as they are registered (no memory, no init).

    Unlike `with torch.device("meta")`, tensors a builder computes its shapes from (RegNet's
    block widths) stay real.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def param(module, name, p):
        if p is not None:
            p = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        register_parameter(module, name, p)

    def buffer(module, name, b, persistent=True):
        register_buffer(module, name, b.to("meta") if b is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def cached_offline(arch: str) -> bool:
    """Whether the DEFAULT weights file is already in the hub cache (usable offline)."""
    url = weights_enum(arch).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()
