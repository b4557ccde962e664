"""The fixed cost of `cnncodes extract` taken apart: seconds of each start-up stage, in a fresh process.

    python bench/startup_stages.py [--arch resnet50] [--weights none] [--device cpu]

Prints one JSON object {stage: seconds}. The stages are the ones `extract` goes through before
its loop (`extract.api.extract` and `extract.runner.Runner`), timed one after the other:
import torch, import torchvision (as cnncodes imports it, without torch._dynamo), the rest of
cnncodes' imports, resolving the weights and preprocessing, building the model (random init, or
the weights read), BatchNorm folding, the channels_last/device move, and the loader's first batch.
`bench/extract_speed.py --fixed-cost` runs it beside the whole command.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    laps: dict[str, float] = {}
    last = _T0

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        laps[name] = round(now - last, 3)
        last = now

    import torch

    lap("import torch")
    from cnncodes.tvimport import torchvision  # noqa: F401

    lap("import torchvision")
    from cnncodes.backbones import create_backbone, fold_batchnorm, resolve_preprocessing, resolve_weights
    from cnncodes.data import ImageFiles, make_loader
    from cnncodes.extract.api import extract  # noqa: F401  (what the command imports)
    from cnncodes.extract.runner import ViewMaker

    lap("import cnncodes (extract, h5py, PIL)")
    dev = torch.device(args.device)
    info = resolve_weights(args.arch, args.weights)
    pre = resolve_preprocessing(args.arch, info)
    lap("resolve weights and preprocessing")
    bb = create_backbone(args.arch, info)
    model = bb.headless().eval().requires_grad_(False)
    lap("build the model" + (" (random init)" if info.kind == "none" else " (weights read)"))
    model = fold_batchnorm(model, args.arch, inplace=True)
    lap("fold BatchNorm")
    model = model.to(dev, memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    lap("channels_last, to the device")
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        Image.new("RGB", (500, 375), (120, 80, 40)).save(Path(tmp) / "a.jpg")
        dataset = ImageFiles(tmp, ["a.jpg"], pre.load, ViewMaker(pre, ["a.jpg"], 0, 0))
        next(iter(make_loader(dataset, 1, None, dev)))
    lap("loader start (first batch of one image)")
    laps["total"] = round(time.perf_counter() - _T0, 3)
    print(json.dumps(laps))


if __name__ == "__main__":
    main()
