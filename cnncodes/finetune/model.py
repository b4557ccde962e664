"""Model pieces: the network with its new classifier, frozen stages and their BatchNorm mode, optimizer, loss.

Recipe -> (model on the device, frozen modules) -> optimizer. The seams for what comes next:
`build_model` is where a classifier initialised from elsewhere (LP-FT from a fit-head head) would
be loaded, and `stage_modules` is the one place that maps stage names to a backbone's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import backbones, distributed
from ..errors import CnnCodesError
from .config import OPTIMIZERS, Recipe

HEAD = "fc"  # the classifier layer of torchvision ResNets: replaced for the new classes, its own lr


def stage_modules(model: nn.Module, stage: str) -> list[nn.Module]:
    """The modules of one ResNet stage (`config.STAGES`): the one place that maps a stage name to modules."""
    return [model.conv1, model.bn1] if stage == "stem" else [getattr(model, stage)]


def freeze_stages(model: nn.Module, stages: Sequence[str]) -> list[nn.Module]:
    """Stop gradients into `stages` and return their modules (kept in eval mode by `set_train_mode`)."""
    frozen = [m for s in stages for m in stage_modules(model, s)]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    """Train mode, except frozen stages: their BatchNorm running statistics must not move."""
    model.train()
    for m in frozen:
        m.eval()


class _MeanPool(nn.Module):
    """Global average pooling with a deterministic CUDA backward (AdaptiveAvgPool2d's is not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def build_model(arch: str, weights: str | backbones.WeightsInfo | None, num_classes: int, freeze: Sequence[str],
                device: torch.device, channels_last: bool, deterministic: bool = False):
    """Pretrained ResNet with a fresh fc for `num_classes`, frozen stages, on `device`.

    Returns (model, weights info, frozen modules).
    """
    model, info = backbones.create_model(arch, weights, num_classes=num_classes)
    # An initial classifier from elsewhere (LP-FT: a fit-head head) would be loaded into model.fc here,
    # before freezing, so the optimizer and the checkpoint see it like any other weights.
    frozen = freeze_stages(model, freeze)
    if deterministic and device.type == "cuda":
        model.avgpool = _MeanPool()  # stateless: the state_dict is unchanged
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info, frozen


def build_model_rank0_first(recipe: Recipe, weights: str | backbones.WeightsInfo | None, device: torch.device):
    """`build_model` for `recipe`; rank 0 fetches the weights (into the torch hub cache) before the
    other ranks read them. Returns (model, frozen modules)."""

    def build():
        return build_model(recipe.arch, weights, len(recipe.classes), recipe.freeze, device,
                           recipe.channels_last, recipe.deterministic)

    built, problem = None, None
    if distributed.is_main():
        try:
            built = build()
        except CnnCodesError as e:
            problem = str(e)
    distributed.share_error(problem, device)
    if built is None:
        built = build()
    model, _, frozen = built
    return model, frozen


def build_optimizer(model: nn.Module, name: str, lr: float, head_lr_mult: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW over the trainable parameters; the new fc gets lr * head_lr_mult."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    body = [p for n, p in trainable if not n.startswith(f"{HEAD}.")]
    head = [p for n, p in trainable if n.startswith(f"{HEAD}.")]
    groups = ([{"params": body, "lr": lr}] if body else []) + [{"params": head, "lr": lr * head_lr_mult}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise CnnCodesError(f"unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}")


def onehot_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy without NLLLoss's gather/scatter, which has no deterministic CUDA kernel."""
    onehot = target[:, None] == torch.arange(logits.shape[1], device=logits.device)
    losses = -(F.log_softmax(logits, dim=1) * onehot).sum(dim=1)
    return losses.sum() if reduction == "sum" else losses.mean()


def loss_function(deterministic: bool, device: torch.device) -> Callable:
    return onehot_cross_entropy if deterministic and device.type == "cuda" else F.cross_entropy
