"""BatchNorm folding for extraction: exact (float tolerance), or skipped with a note, never silently."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._api import set_module


def count_batchnorm(model: nn.Module) -> int:
    """BatchNorm layers of any kind (timm's BatchNormAct2d, SyncBatchNorm and other subclasses included)."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _split_norm_act(model: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d (BN, then dropout and activation, in one module) as a plain
    BatchNorm2d followed by its own dropout and activation: the same function, and a
    Conv2d -> BatchNorm2d pair that `fuse` recognises (it matches exact types)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and hasattr(m, "act") and hasattr(m, "drop"):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            bn.load_state_dict(m.state_dict())
            set_module(model, name, nn.Sequential(bn, m.drop, m.act).train(m.training))
    return model


def fold_batchnorm(model: nn.Module, arch: str = "", log: Callable[[str], None] | None = None) -> nn.Module:
    """Fold eval-mode BatchNorm into the convolution feeding it (torch.fx `fuse`).

    `fuse` folds only an exact `Conv2d -> BatchNorm2d` pair whose conv output has no other
    user (timm's BatchNormAct2d is split into BN + activation first), so the function is unchanged (tested per family against the unfolded model). A BN
    that follows no conv (DenseNet's pre-activation BN) stays an eval-mode BN. A model fx
    cannot trace is kept unfolded, and `log` says so.
    """
    from torch.fx.experimental.optimization import fuse

    before = count_batchnorm(model)
    if before == 0:
        return model  # nothing to fold (ViT, Swin, ConvNeXt use LayerNorm)
    try:
        fused = fuse(_split_norm_act(copy.deepcopy(model)), inplace=True).eval().requires_grad_(False)
    except Exception as e:  # noqa: BLE001 - an untraceable model: still correct, just unfolded
        if log:
            log(f"note: BatchNorm folding skipped for {arch or type(model).__name__}: torch.fx cannot trace it "
                f"({type(e).__name__}); codes are the same, extraction somewhat slower")
        return model
    left = count_batchnorm(fused)
    if left and log:
        log(f"note: BatchNorm folding: {before - left} of {before} BatchNorm layers of {arch} folded "
            f"(the others follow no convolution and run as eval-mode BatchNorm)")
    return fused
