"""Model pieces: the network with its new classifier, frozen stages and their BatchNorm mode, optimizer, loss.

Recipe -> (model on the device, frozen modules) -> optimizer. `set_init_head` loads a classifier
fitted elsewhere (LP-FT from a fit-head head, through `Backbone.set_classifier`), and `resolve_freeze`
is the one place that maps `--freeze` names to a backbone's parameters (its own stages/blocks, or
parameter-name prefixes).
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

HEAD = "fc"  # the classifier of torchvision ResNets; every backbone names its own (Backbone.classifier_name)
RESNET_STEM = ("conv1", "bn1")  # `stem` of a ResNet (torchvision or timm): what runs before layer1


def set_init_head(bb: backbones.Backbone, init: InitHead) -> None:
    """Put a folded fit-head head in as the classifier (LP-FT): its logits are the head's scores."""
    want = (init.weight.shape[0], bb.num_features)
    if tuple(init.weight.shape) != want:
        raise CnnCodesError(f"{init.path}: head is {init.weight.shape[0]} classes x {init.weight.shape[1]}-d codes, "
                            f"the model's classifier {want[0]} x {want[1]}; fit the head on codes of this arch")
    bb.set_classifier(torch.from_numpy(init.weight), torch.from_numpy(init.bias))


def freeze_groups(bb: backbones.Backbone) -> dict[str, list[str]]:
    """`--freeze` names of a backbone -> the module / parameter-name prefixes each one freezes.

    The model's own stage/block structure (`Backbone.stages()`, groups holding parameters, the
    classifier excluded: it is new), plus `stem`: a ResNet's conv1+bn1, or the `stem` group of a
    timm model's `group_matcher(coarse=True)`.
    """
    names = {n for n, _ in bb.model.named_parameters()}
    groups = {g: mods for g, mods in bb.stages() if g != "classifier" and any(_under(n, m) for n in names for m in mods)}
    if all(hasattr(bb.model, m) for m in (*RESNET_STEM, "layer1")):
        return {"stem": list(RESNET_STEM), **groups}
    matcher = getattr(bb.model, "group_matcher", None)
    stem = matcher(coarse=True).get("stem") if callable(matcher) else None
    if isinstance(stem, str):
        import re

        stem_params = [n for n in sorted(names) if re.match(stem, n)]
        if stem_params:
            return {"stem": stem_params, **groups}
    return groups


def _under(param: str, prefix: str) -> bool:
    """`param` is `prefix` or inside it (dotted: `layer1` does not take `layer10.x`; `cls_` takes `cls_token`)."""
    return param == prefix or param.startswith(prefix if prefix.endswith((".", "_")) else prefix + ".")


def resolve_freeze(bb: backbones.Backbone, freeze: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """(the names in network order, the parameter-name prefixes they freeze) for `bb`.

    A name is a group of `freeze_groups` or a parameter-name prefix (`features.0`, `layer4.1.conv`);
    anything else is one clear error listing the valid names.
    """
    groups, params = freeze_groups(bb), [n for n, _ in bb.model.named_parameters()]
    cls = bb.classifier_name
    unknown = [f for f in freeze if f not in groups and (not any(_under(n, f) for n in params)
                                                          or _under(cls, f) or _under(f, cls))]
    if unknown:
        example = params[0].rpartition(".")[0] or params[0]  # the module holding the first parameter
        raise CnnCodesError(f"--freeze: unknown stage(s) {', '.join(unknown)} for {bb.arch}; choose among "
                            f"{','.join(groups)}, or a parameter-name prefix such as {example} "
                            f"(not the new classifier {cls})")
    prefixes = {f: groups.get(f, [f]) for f in freeze}
    first = {f: min(i for i, n in enumerate(params) if any(_under(n, p) for p in ps)) for f, ps in prefixes.items()}
    ordered = tuple(sorted(freeze, key=first.__getitem__))  # stable: ties keep the given order
    return ordered, [p for f in ordered for p in prefixes[f]]


def freeze_order(arch: str, freeze: Sequence[str]) -> tuple[str, ...]:
    """`freeze` validated against `arch` and put in network order, before any run folder is touched.

    Built on the meta device (no memory, no weights); where a builder cannot run there, on the CPU.
    """
    return resolve_freeze(skeleton(arch), freeze)[0] if freeze else ()


def skeleton(arch: str) -> backbones.Backbone:
    """`arch` with random weights on the meta device (no memory), to look at its structure;
    where a builder cannot run there (shapes computed from tensors), on the CPU."""
    try:
        with torch.device("meta"):
            return backbones.create_backbone(arch, "none")
    except Exception:  # noqa: BLE001 - e.g. RegNet: build it for real
        return backbones.create_backbone(arch, "none")


def global_pools(model: nn.Module) -> list[str]:
    """The `AdaptiveAvgPool2d(1)` modules, which `build_model` swaps for `_MeanPool` under --deterministic on CUDA."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]


def deterministic_note(arch: str) -> str | None:
    """Where the deterministic pooling swap does not apply to `arch`, a note saying so (never silently)."""
    if global_pools(skeleton(arch).model):
        return None
    return (f"--deterministic on CUDA: {arch} has no AdaptiveAvgPool2d(1) module to replace by a deterministic mean; "
            f"if its pooling backward has no deterministic CUDA kernel, torch stops the run with an error")


def freeze_stages(model: nn.Module, prefixes: Sequence[str]) -> list[nn.Module]:
    """Stop gradients into the parameters under `prefixes`; return the frozen modules (kept in eval mode)."""
    for name, p in model.named_parameters():
        if any(_under(name, f) for f in prefixes):
            p.requires_grad_(False)
    modules = dict(model.named_modules())
    return [modules[f] for f in prefixes if f in modules]


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    """Train mode, except frozen modules and every BatchNorm whose parameters are all frozen:
    their running statistics must not move."""
    model.train()
    for m in frozen:
        m.eval()
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()


class _MeanPool(nn.Module):
    """Global average pooling with a deterministic CUDA backward (AdaptiveAvgPool2d's is not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def build_model(arch: str, weights: str | backbones.WeightsInfo | None, num_classes: int, freeze: Sequence[str],
                device: torch.device, channels_last: bool, deterministic: bool = False, init: InitHead | None = None):
    """The pretrained backbone with a fresh classifier for `num_classes` (or `init`, a fit-head head),
    frozen stages, on `device`.

    Returns (model, weights info, frozen modules, the classifier's dotted name).
    """
    bb = backbones.create_backbone(arch, weights, num_classes=num_classes)
    model, info = bb.model, bb.info
    if init is not None:  # before freezing and the move: the optimizer and checkpoint see plain weights
        set_init_head(bb, init)
    frozen = freeze_stages(model, resolve_freeze(bb, freeze)[1])
    if deterministic and device.type == "cuda":
        for name in global_pools(model):  # AdaptiveAvgPool2d's CUDA backward is not deterministic
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _MeanPool())  # stateless: the state_dict is unchanged
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info, frozen, bb.classifier_name


def build_model_rank0_first(recipe: Recipe, weights: str | backbones.WeightsInfo | None, device: torch.device,
                            init: InitHead | None = None):
    """`build_model` for `recipe`; rank 0 fetches the weights (into the torch hub cache) before the
    other ranks read them. Returns (model, frozen modules, the classifier's dotted name)."""

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
    model, _, frozen, head = built
    return model, frozen, head


def build_optimizer(model: nn.Module, name: str, lr: float, head_lr_mult: float,
                    weight_decay: float, head_name: str = HEAD) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW over the trainable parameters; the new classifier (`head_name`)
    gets lr * head_lr_mult."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    body = [p for n, p in trainable if not n.startswith(f"{head_name}.")]
    head = [p for n, p in trainable if n.startswith(f"{head_name}.")]
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
