"""Codes from intermediate layers: each layer's output globally average-pooled, concatenated in order.

torchvision models go through `feature_extraction.create_feature_extractor` (node names from
`get_graph_node_names`); timm models through the same torch.fx extractor (timm's own fx helpers
make its models traceable), with the names of `feature_info` listed first.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from ..errors import CnnCodesError
from . import _timm
from ._api import Backbone


def layer_names(bb: Backbone) -> list[str]:
    """The names `--layer` accepts (modules and fx nodes of the eval-mode graph), in forward order."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(_traceable(bb))
    names: dict[str, None] = {}
    for node in nodes:  # a module name (e.g. `layer2`) gives the output of its last node
        parts = node.split(".")
        for i in range(1, len(parts) + 1):
            names.setdefault(".".join(parts[:i]), None)
    return list(names)


def _traceable(bb: Backbone) -> nn.Module:
    model = bb.model.eval()
    if bb.arch.startswith(_timm.PREFIX):
        try:
            from timm.layers import set_layer_config
            set_layer_config(exportable=True)
        except ImportError:
            pass
    return model


class PooledLayers(nn.Module):
    """An fx feature extractor whose outputs are pooled to (N, C) each and concatenated."""

    def __init__(self, extractor: nn.Module, names: list[str], channels_last: set[str] = frozenset()):
        super().__init__()
        self.extractor, self.names, self.channels_last = extractor, names, set(channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        return torch.cat([pool(out[n], n in self.channels_last) for n in self.names], dim=1)


def pool(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(N, C, H, W) -> mean over H, W; (N, H, W, C) (`channels_last`) -> mean over H, W;
    (N, L, C) token sequences -> mean over tokens; (N, C) as is."""
    if t.ndim == 2:
        return t
    if t.ndim == 3:
        return t.mean(dim=1)
    if t.ndim == 4:
        return t.mean(dim=(1, 2)) if channels_last else t.mean(dim=(2, 3))
    raise CnnCodesError(f"cannot pool a layer output of shape {tuple(t.shape)}")


def channels_last_layers(bb: Backbone, names: list[str]) -> set[str]:
    """The names among `names` whose 4-d output is (N, H, W, C), known from the model, not guessed
    from the shape (a Swin stage at 384 px is (N, 96, 96, 96)).

    Models whose stages run channels-last: torchvision's Swin (`features` and `norm`, up to its
    final `permute`) and timm models that declare `output_fmt == "NHWC"` (Swin, Swin V2, MambaOut,
    Sequencer, ...). There, stage and block outputs are NHWC and a convolution's output NCHW (the
    stem's patch conv); a node inside a stem that permutes back and forth (MambaOut's) is not
    told apart: name the stem or a stage instead.
    """
    scope = _channels_last_scope(bb)
    modules = dict(bb.model.named_modules())
    return {n for n in names if n.split(".")[0] in scope and not isinstance(modules.get(n), nn.Conv2d)}


PROBE_WIDTH_STEP = 64  # extra input width of the layout probe: >= 1 more column at any stride up to 64


def probe_channels_last(extractor: nn.Module, names: list[str], narrow: dict[str, torch.Tensor],
                        size: int) -> set[str] | None:
    """The names whose 4-d output is (N, H, W, C), read from which axis grows with the input's width
    (axis 2: NHWC, axis 3: NCHW) between `narrow` (the outputs for a size x size input) and a
    wider probe pass; None where the model refuses a wider input (a fixed patch grid, such as
    timm's Swin): then `channels_last_layers`' rule. The probe also sees what no model-level rule
    can, e.g. the MLP inside a ConvNeXt block of an NCHW model."""
    try:
        with torch.no_grad():
            wide = extractor(torch.zeros(1, 3, size, size + PROBE_WIDTH_STEP))
    except Exception:  # noqa: BLE001 - a model that takes one input size only (assertions, shape errors)
        return None
    return {n for n in names if narrow[n].ndim == 4 and narrow[n].shape[2] != wide[n].shape[2]
            and narrow[n].shape[3] == wide[n].shape[3]}


def _channels_last_scope(bb: Backbone) -> set[str]:
    """The model's top-level modules that run channels-last (empty for an NCHW model)."""
    model = bb.model
    if bb.arch.startswith(_timm.PREFIX):
        if not str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC"):
            return set()
        head = bb.classifier_name.split(".")[0]  # the head pools to (N, C) itself
        return {name for name, _ in model.named_children() if name != head}
    if isinstance(model, torchvision.models.SwinTransformer):
        return {"features", "norm"}  # then `permute` back to NCHW, `avgpool`, `head`
    return set()


def layer_extractor(bb: Backbone, layers: str) -> tuple[nn.Module, int]:
    """(model returning the concatenated pooled codes, their dimension) for `layers` = "A,B"."""
    from torchvision.models.feature_extraction import create_feature_extractor

    names = [n for n in layers.split(",") if n]
    known = layer_names(bb)
    bad = [n for n in names if n not in known]
    if bad:
        import difflib
        near = difflib.get_close_matches(bad[0], known, n=5, cutoff=0.5)
        raise CnnCodesError(f"--layer {bad[0]}: no such layer in {bb.arch}"
                            + (f"; nearest: {', '.join(near)}" if near else "")
                            + f"; `cnncodes archs {bb.arch} --layers` lists them")
    extractor = create_feature_extractor(_traceable(bb), return_nodes={n: n for n in names})
    size = 224 if bb.fixed_size is None else bb.fixed_size
    with torch.no_grad():  # one pass gives both the probe's narrow outputs and the code dimension
        narrow = extractor(torch.zeros(1, 3, size, size))
    probed = None if bb.fixed_size is not None else probe_channels_last(extractor, names, narrow, size)
    layout = channels_last_layers(bb, names) if probed is None else probed
    model = PooledLayers(extractor, names, layout).eval()
    dim = sum(pool(narrow[n], n in layout).shape[1] for n in names)
    return model, int(dim)
