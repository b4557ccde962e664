"""`extract`: one pass of a headless pretrained backbone over an image folder, its codes cached to HDF5.

Where things live (each module imports only those above it):
    config.py  the options, once: ExtractConfig (validated; torch-free, the CLI is built from it)
    runner.py  the loop: decoded views -> backbone -> codes -> atomic shards (Runner, ShardWriter, ViewMaker)
    api.py     `extract` (the API): lock, resume from shards, merge into the cache
"""

from __future__ import annotations

from ..lazy import lazy_exports

# name -> submodule. Imported on first use, so the CLI can build its options from
# `config` (torch-free) without importing torch.
_EXPORTS = {
    "CODE_FIELDS": "config", "DECODES": "config", "ExtractConfig": "config",
    "Runner": "runner", "ShardWriter": "runner", "ViewMaker": "runner",
    "ExtractResult": "api", "JPEG_SUFFIXES": "api", "extract": "api",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
