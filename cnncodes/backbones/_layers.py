"""Codes from intermediate layers: each layer's output globally average-pooled, concatenated in order.

torchvision models go through `feature_extraction.create_feature_extractor` (node names from
`get_graph_node_names`); timm models through the same torch.fx extractor (timm's own fx helpers
make its models traceable), with the names of `feature_info` listed first.
"""

from __future__ import annotations

import torch
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

    def __init__(self, extractor: nn.Module, names: list[str]):
        super().__init__()
        self.extractor, self.names = extractor, names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        return torch.cat([pool(out[n]) for n in self.names], dim=1)


def pool(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> mean over H, W; (N, L, C) token sequences -> mean over tokens; (N, C) as is.

    Channels-last stage outputs (Swin, (N, H, W, C)) are averaged over H and W.
    """
    if t.ndim == 2:
        return t
    if t.ndim == 3:
        return t.mean(dim=1)
    if t.ndim == 4:
        channels_last = t.shape[-1] > t.shape[1] and t.shape[1] == t.shape[2]  # (N, H, W, C)
        return t.mean(dim=(1, 2)) if channels_last else t.mean(dim=(2, 3))
    raise CnnCodesError(f"cannot pool a layer output of shape {tuple(t.shape)}")


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
    model = PooledLayers(extractor, names).eval()
    size = 224 if bb.fixed_size is None else bb.fixed_size
    with torch.no_grad():
        dim = model(torch.zeros(1, 3, size, size)).shape[1]
    return model, int(dim)
