"""BatchNorm folding for extraction: exact (float tolerance), or skipped with a note, never silently."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def count_batchnorm(model: nn.Module) -> int:
    return sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in model.modules())


def fold_batchnorm(model: nn.Module, arch: str = "", log: Callable[[str], None] | None = None) -> nn.Module:
    """Fold eval-mode BatchNorm into the convolution feeding it (torch.fx `fuse`).

    `fuse` folds only an exact `Conv2d -> BatchNorm2d` pair whose conv output has no other
    user, so the function is unchanged (tested per family against the unfolded model). A BN
    that follows no conv (DenseNet's pre-activation BN) stays an eval-mode BN. A model fx
    cannot trace is kept unfolded, and `log` says so.
    """
    from torch.fx.experimental.optimization import fuse

    before = count_batchnorm(model)
    if before == 0:
        return model  # nothing to fold (ViT, Swin, ConvNeXt use LayerNorm)
    try:
        fused = fuse(model).eval().requires_grad_(False)
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
