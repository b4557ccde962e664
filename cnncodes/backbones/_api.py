"""The one head API every backbone has, and the records that travel with codes (weights identity).

A `Backbone` wraps a full classification model (torchvision or timm) with the dotted name of
its final classification layer. The code of an image is what that layer receives; removing
it (`headless`) turns the model into an extractor, replacing it (`reset_classifier`) into a
model for fine-tuning or for a fitted head (`set_classifier`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

RANDOM_INIT_SEED = 0  # `--weights none` is seeded so reruns and resumes give the same codes


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, recorded in caches and heads."""

    kind: str  # "torchvision" | "timm" | "file" | "none"
    name: str  # enum name (ResNet50_Weights.IMAGENET1K_V2), timm tag, file name, or "none"
    sha256: str = ""  # of the file, for kind == "file"

    @property
    def identity(self) -> str:
        if self.kind == "file":
            return f"file:sha256:{self.sha256}"
        if self.kind in ("torchvision", "timm"):
            return f"{self.kind}:{self.name}"
        return f"none:seed{RANDOM_INIT_SEED}"


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class Backbone:
    """A classification model plus where its classifier is (see the module docstring).

    `classifier_name` is dotted (`fc`, `classifier.1`, `heads.head`, ...). SqueezeNet's
    classifier is a 1x1 conv followed by ReLU and global pooling: its code is the 512 pooled
    channels, and a new classifier there is a 1x1 conv with the ReLU removed (`extra_identity`),
    which is exact since pooling and a 1x1 conv commute.
    """

    def __init__(self, arch: str, model: nn.Module, classifier_name: str, num_features: int,
                 info: WeightsInfo, *, extra_identity: tuple[str, ...] = (), fixed_size: int | None = None):
        self.arch, self.model, self.classifier_name = arch, model, classifier_name
        self.num_features, self.info = num_features, info
        self.extra_identity = extra_identity  # modules after the classifier that must go with it
        self.fixed_size = fixed_size  # the only input size the model takes (ViT patch grid), or None

    def classifier(self) -> nn.Module:
        return get_module(self.model, self.classifier_name)

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The parameters of the final classification layer (the head-LR multiplier's group)."""
        return list(self.classifier().parameters())

    def _new_layer(self, num_classes: int) -> nn.Module:
        if isinstance(self.classifier(), nn.Conv2d):
            return nn.Conv2d(self.num_features, num_classes, kernel_size=1)
        return nn.Linear(self.num_features, num_classes)

    def reset_classifier(self, num_classes: int) -> nn.Module:
        """Replace the classifier by a fresh layer with `num_classes` outputs; returns the model."""
        set_module(self.model, self.classifier_name, self._new_layer(num_classes))
        for name in self.extra_identity:
            set_module(self.model, name, nn.Identity())
        return self.model

    def set_classifier(self, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
        """A new classifier with the given (K, D) weight and (K,) bias (a fitted head folded in)."""
        self.reset_classifier(weight.shape[0])
        layer = self.classifier()
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(layer.weight.shape))
            layer.bias.copy_(bias)
        return self.model

    def headless(self) -> nn.Module:
        """The model with its classifier removed: it returns the (N, num_features) codes."""
        set_module(self.model, self.classifier_name, nn.Identity())
        for name in self.extra_identity:
            set_module(self.model, name, nn.Identity())
        return self.model

    def stages(self) -> list[tuple[str, list[str]]]:
        """The model's own stage/block groups in forward order, as (group, [module names]) for --freeze.

        The classifier is the last group. torchvision: top-level children, with a `features`
        / `layers` / `trunk_output` / `encoder.layers` container split into its blocks.
        """
        groups: list[tuple[str, list[str]]] = []
        for name, child in self.model.named_children():
            if self.classifier_name == name or self.classifier_name.startswith(name + "."):
                continue
            if name in ("features", "layers", "trunk_output", "blocks", "stages") and len(child) > 1:
                groups += [(f"{name}.{n}", [f"{name}.{n}"]) for n, _ in child.named_children()]
            elif name == "encoder" and hasattr(child, "layers"):
                groups += [(f"encoder.layers.{n}", [f"encoder.layers.{n}"]) for n, _ in child.layers.named_children()]
                groups += [(f"encoder.{n}", [f"encoder.{n}"]) for n, _ in child.named_children() if n != "layers"]
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                groups.append((name, [name]))
        groups.append(("classifier", [self.classifier_name]))
        return groups
