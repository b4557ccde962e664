"""cnncodes: transfer learning on image folders with pretrained torchvision and timm networks.

Frozen path: `extract` caches CNN codes to HDF5, heads train on them in seconds.
Fine-tune path: `finetune` trains the whole network end to end.
"""

from ._version import __version__
from .errors import CnnCodesError

__all__ = ["CnnCodesError", "__version__", "extract", "discover", "Cache"]


def __getattr__(name: str):
    # Lazy imports keep `import cnncodes` and `cnncodes --help` fast.
    if name == "extract":
        from .extract import extract

        return extract
    if name == "discover":
        from .data import discover

        return discover
    if name == "Cache":
        from .store import Cache

        return Cache
    raise AttributeError(name)
