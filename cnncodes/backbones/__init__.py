"""Backbones: any torchvision classifier or timm model, behind one head API (`Backbone`).

`create_backbone(arch, weights)` builds the full model with its weights; `Backbone.headless()`
gives the code extractor (the input of the final classification layer), `reset_classifier(n)`
a model for fine-tuning, `set_classifier(w, b)` one with a fitted head folded in.
"""

from ._api import RANDOM_INIT_SEED, Backbone, WeightsInfo
from ._build import (
    canonical_arch,
    check_arch,
    code_dim,
    create_backbone,
    create_extractor,
    create_model,
    default_preprocessing,
    fixed_size,
    is_timm,
    list_layers,
    parse_layers,
    resolve_preprocessing,
    resolve_weights,
    stock_loader_steps,
    stock_mismatch,
    weights_cached,
    weights_enum_names,
)
from ._fold import fold_batchnorm
from ._weights import load_state_file

__all__ = [
    "RANDOM_INIT_SEED", "Backbone", "WeightsInfo", "canonical_arch", "check_arch", "code_dim", "create_backbone",
    "create_extractor", "create_model", "default_preprocessing", "fixed_size", "fold_batchnorm", "is_timm", "list_layers", "parse_layers",
    "load_state_file", "resolve_preprocessing", "resolve_weights", "stock_loader_steps",
    "stock_mismatch", "weights_cached", "weights_enum_names",
]
