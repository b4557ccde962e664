"""Model pieces: the network with its new classifier, frozen stages and their BatchNorm mode, optimizer, loss.

Recipe -> (model on the device, frozen modules) -> optimizer. The seams for other backbones:
`classifier_layer` is the one place that knows where the classifier is, and `stage_modules` the
one place that maps stage names to a backbone's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import backbones, distributed
from ..errors import CnnCodesError
from .config import OPTIMIZERS, Recipe
from .lpft import InitHead

HEAD = "fc"  # the classifier layer of torchvision ResNets: replaced for the new classes, its own lr


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's classifier (a ResNet's `fc`): the one place that knows where it is."""
    return model.get_submodule(HEAD)


def set_classifier(model: nn.Module, init: InitHead) -> None:
    """Copy a folded fit-head head into the classifier (LP-FT): its logits are the head's scores."""
    layer = classifier_layer(model)
    if tuple(layer.weight.shape) != init.weight.shape:
        raise CnnCodesError(f"{init.path}: head is {init.weight.shape[0]} classes x {init.weight.shape[1]}-d codes, "
                            f"the model's classifier {layer.weight.shape[0]} x {layer.weight.shape[1]}; "
                            f"fit the head on codes of this arch")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(init.weight))
        layer.bias.copy_(torch.from_numpy(init.bias))


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
                device: torch.device, channels_last: bool, deterministic: bool = False, init: InitHead | None = None):
    """Pretrained ResNet with a fresh classifier for `num_classes` (or `init`, a fit-head head), frozen stages,
    on `device`. Returns (model, weights info, frozen modules).
    """
    model, info = backbones.create_model(arch, weights, num_classes=num_classes)
    if init is not None:  # before freezing and the move: the optimizer and checkpoint see plain weights
        set_classifier(model, init)
    frozen = freeze_stages(model, freeze)
    if deterministic and device.type == "cuda":
        model.avgpool = _MeanPool()  # stateless: the state_dict is unchanged
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info, frozen


def build_model_rank0_first(recipe: Recipe, weights: str | backbones.WeightsInfo | None, device: torch.device,
                            init: InitHead | None = None):
    """`build_model` for `recipe`; rank 0 fetches the weights (into the torch hub cache) before the
    other ranks read them. Returns (model, frozen modules)."""

    def build():
        return build_model(recipe.arch, weights, len(recipe.classes), recipe.freeze, device,
                           recipe.channels_last, recipe.deterministic, init)

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
    """SGD (momentum 0.9) or AdamW over the trainable parameters; the classifier gets lr * head_lr_mult."""
    in_head = {id(p) for p in classifier_layer(model).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    body = [p for p in trainable if id(p) not in in_head]
    head = [p for p in trainable if id(p) in in_head]
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
