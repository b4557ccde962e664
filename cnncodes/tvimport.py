"""`import torchvision` without importing torch._dynamo: about 1 s of every command's start-up
on a 2-core CPU, for a module that extraction never uses.

`import torchvision` imports all its models, hence `torchvision.ops.roi_align`, whose first line
is `from torch._dynamo.utils import is_compile_supported`, a function it calls only when
roi_align runs. While torchvision is imported, that one name is served by a stand-in that
imports the real function on its first call; the stand-in modules are removed right after, so
a later `import torch._dynamo` (torch.compile, timm) imports the real one as usual. If anything
else in torchvision's import needs torch._dynamo, the import is simply redone without the
stand-in (correct, only slower).
"""

from __future__ import annotations

import sys
import types

import torch

_STANDIN = "torch._dynamo"


def is_compile_supported(device_type):
    """torch._dynamo.utils.is_compile_supported, imported on its first call."""
    from torch._dynamo.utils import is_compile_supported as real

    return real(device_type)


def _import_torchvision() -> types.ModuleType:
    if "torchvision" in sys.modules or _STANDIN in sys.modules:
        import torchvision

        return torchvision
    package, utils = types.ModuleType(_STANDIN), types.ModuleType(f"{_STANDIN}.utils")
    package.__path__ = []  # a package, so `torch._dynamo.utils` resolves to the stand-in below
    package.utils, utils.is_compile_supported = utils, is_compile_supported
    sys.modules[_STANDIN], sys.modules[utils.__name__] = package, utils
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - a torchvision that needs more of torch._dynamo: import it plainly
        _remove_standin(package, utils)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    finally:
        _remove_standin(package, utils)
    return torchvision


def _remove_standin(package: types.ModuleType, utils: types.ModuleType) -> None:
    for name, module in ((_STANDIN, package), (utils.__name__, utils)):
        if sys.modules.get(name) is module:
            del sys.modules[name]
    if vars(torch).get("_dynamo") is package:  # (not getattr: torch.__getattr__ would import the real one)
        delattr(torch, "_dynamo")


torchvision = _import_torchvision()
