"""timm backbones (`--arch timm:NAME`), through the optional extra `pip install "cnncodes[timm]"`.

`timm.create_model(NAME, num_classes=...)`; the classifier is `get_classifier()`, named by the
model's pretrained_cfg; preprocessing from `timm.data.resolve_data_config` on that cfg.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import CnnCodesError
from ._api import Backbone, WeightsInfo
from ._weights import fit_state, load_state_file

PREFIX = "timm:"


def require_timm():
    try:
        import timm
    except ImportError:
        raise CnnCodesError('--arch timm:NAME needs timm: pip install "cnncodes[timm]" (or pip install timm)') from None
    return timm


@functools.cache
def names() -> tuple[str, ...]:
    return tuple(require_timm().list_models())


def pretrained_cfg(name: str) -> dict:
    timm = require_timm()
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        base, _, _ = name.partition(".")
        cfg = timm.models.get_pretrained_cfg(base)
    return cfg.to_dict() if cfg is not None else {}


def resolve_default(name: str) -> WeightsInfo:
    cfg = pretrained_cfg(name)
    tag = f"{cfg.get('architecture', name.partition('.')[0])}.{cfg['tag']}" if cfg.get("tag") else name
    return WeightsInfo("timm", tag)


def _create(name: str, info: WeightsInfo, num_classes: int):
    timm = require_timm()
    kw = {"num_classes": num_classes}
    if info.kind != "timm":
        return timm.create_model(name, pretrained=False, **kw)
    if not cached_offline(PREFIX + info.name) and not _hub_reachable():
        raise CnnCodesError(f"timm weights {info.name} are not in the local cache and huggingface.co cannot be reached "
                            f"(offline?); download them once online (HF cache: {os.environ.get('HF_HOME', '~/.cache/huggingface')}), "
                            f"or pass --weights PATH to a local .safetensors/.pth, or --weights none")
    try:
        # the hub cache only; timm reads its files with weights_only=True or as safetensors
        return timm.create_model(info.name, pretrained=True, **kw)
    except Exception as e:  # noqa: BLE001 - offline, missing file, ...: one clear line
        raise CnnCodesError(f"cannot get timm weights {info.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"offline? download them once online (HF cache: {os.environ.get('HF_HOME', '~/.cache/huggingface')}), "
                            f"or pass --weights PATH to a local .safetensors/.pth, or --weights none") from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline run fails at once instead of after the hub client's retries."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def build(arch: str, info: WeightsInfo) -> Backbone:
    """The timm model with a classifier (1000 classes or the weights' own), wrapped in a Backbone."""
    name = arch.removeprefix(PREFIX)
    cfg = pretrained_cfg(name)
    model = _create(name, info, int(cfg.get("num_classes") or 1000))
    cls_name = model.pretrained_cfg.get("classifier") or cfg.get("classifier") or "fc"
    if isinstance(cls_name, (list, tuple)):
        cls_name = cls_name[-1]
    layer = model.get_submodule(cls_name)
    dim = getattr(layer, "in_features", None) or getattr(model, "head_hidden_size", None) or model.num_features
    fixed = int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") else None
    bb = Backbone(arch, model, cls_name, int(dim), info, fixed_size=fixed)
    if info.kind == "file":
        fit_state(model, load_state_file(info.name), (cls_name + ".",), arch, info.name)
    return bb


def preprocessing_fields(arch: str) -> dict:
    """timm's resolved data config as resize/crop: resize = floor(crop / crop_pct) (0.875: 256/224)."""
    timm = require_timm()
    name = arch.removeprefix(PREFIX)
    cfg = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg(name))
    _, h, w = cfg["input_size"]
    if h != w:
        raise CnnCodesError(f"{arch}: non-square input size {h}x{w} is not supported yet (cnncodes crops squares)")
    if cfg.get("crop_mode", "center") != "center":
        raise CnnCodesError(f"{arch}: crop_mode '{cfg['crop_mode']}' is not supported yet (cnncodes center-crops)")
    if cfg["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        raise CnnCodesError(f"{arch}: interpolation '{cfg['interpolation']}' is not supported (bilinear, bicubic, nearest)")
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return {"resize": int(h // crop_pct) if crop_pct < 1 else h, "crop": int(h), "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]), "interpolation": cfg["interpolation"]}


def code_dim(arch: str) -> int:
    with torch.device("meta"):
        return build(arch, WeightsInfo("none", "none")).num_features


def cached_offline(arch: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    cfg = pretrained_cfg(arch.removeprefix(PREFIX))
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return False
    return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
