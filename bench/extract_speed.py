"""Extraction throughput vs the model-only ceiling and a tutorial-style loop, in one run.

    python bench/extract_speed.py [--data DIR] [--archs resnet18,resnet50] [--precisions fp32,bf16]

For each arch and precision it prints, measured back to back on this machine:
  extract   images/s of `cnncodes.extract` on real JPEGs (decode, resize, network, shards;
            loader start-up and the first, slow batch included)
  ceiling   images/s of the same extractor model (same arch, precision, batch, channels_last)
            on synthetic tensors already in memory: what the network alone can do
  decode    images/s of the loader alone (decode + resize + crop, as extract runs it)
  bound     decode / (decode + ceiling): the best ratio possible when decoding and the network
            share the same cores (no GPU), each at its full speed, taking turns
  tutorial  images/s of the PyTorch tutorial's loop: ImageFolder + PIL transforms,
            DataLoader(batch_size=4, num_workers=4), fp32, NCHW, a forward per batch
A shared machine is noisy (the ceiling alone moves by 20% from one minute to the next), so
every extract run sits between two ceiling runs: ratio = the median over --repeats of
extract / mean(ceiling before, ceiling after); the images/s shown are the best of the repeats.
Targets: extract >= 0.85 x ceiling, and >= 5 x tutorial.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_data, hardware, timed  # noqa: E402

from cnncodes.backbones import create_extractor  # noqa: E402
from cnncodes.data import ImageFiles, Preprocessing, discover, make_loader  # noqa: E402
from cnncodes.extract import ViewMaker, extract  # noqa: E402
from cnncodes.runtime import autocast, configure_threads, inference_batch_size, resolve_device  # noqa: E402


def ceiling(arch: str, precision: str, batch: int, images: int, device: torch.device) -> float:
    """Images/s of the extractor model alone on synthetic, pre-normalised tensors."""
    model, _, _ = create_extractor(arch, "none")
    model = model.to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    steps = max(1, math.ceil(images / batch))

    @torch.inference_mode()
    def run(n: int) -> None:
        with autocast(device, precision):
            for _ in range(n):
                model(x)

    run(1)  # warm-up: oneDNN/cuDNN pick their kernels
    seconds, _ = timed(run, steps)
    return steps * batch / seconds


def decode(data: Path, batch: int, workers: int | None, device: torch.device) -> float:
    """Images/s of extract's loader alone: decode, resize and crop, no network."""
    layout = discover(data)
    files = [f for split in layout.splits.values() for f in split]
    paths = [f.path for f in files]
    pre = Preprocessing()
    dataset = ImageFiles(layout.root, paths, pre.load, ViewMaker(pre, paths, 0, 0))
    loader = make_loader(dataset, batch, workers, device)
    seconds, n = timed(lambda: sum(len(b.indices) for b in loader))
    return n / seconds


def tutorial(arch: str, data: Path, images: int, device: torch.device) -> float:
    """Images/s of the tutorial-style loop (its transforms, batch 4, 4 workers, fp32, NCHW)."""
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    roots = [data / s for s in ("train", "val") if (data / s).is_dir()] or [data]
    dataset = torch.utils.data.ConcatDataset([torchvision.datasets.ImageFolder(r, tf) for r in roots])
    subset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=4, shuffle=False, num_workers=4)
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)

    def run() -> int:
        n = 0
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
                n += len(x)
        return n

    seconds, n = timed(run)
    return n / seconds


def best(repeats: int, fn) -> float:
    return max(fn() for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's (16 on CPU, 128 on CUDA)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is kept")
    p.add_argument("--tutorial-images", type=int, default=160, help="images timed for the slow tutorial loop")
    args = p.parse_args()
    data = args.data or default_data()
    device = resolve_device(args.device)
    configure_threads(device)
    batch = args.batch_size or inference_batch_size(device)
    n_images = sum(len(v) for v in discover(data).splits.values())
    print(f"data: {data} ({n_images} images); batch {batch}; best of {args.repeats}; {hardware()}")
    dec = best(args.repeats, lambda: decode(data, batch, args.workers, device))
    print(f"decode (loader alone): {dec:.1f} img/s")
    print(f"{'arch':10} {'prec':5} {'extract':>9} {'ceiling':>9} {'ratio':>6} {'bound':>6} {'tutorial':>9} {'speed-up':>8}")
    rows = []
    for arch in args.archs.split(","):
        tut = best(args.repeats, lambda: tutorial(arch, data, args.tutorial_images, device))
        for precision in args.precisions.split(","):
            def run_extract() -> float:
                with tempfile.TemporaryDirectory() as tmp:
                    r = extract(data, Path(tmp) / "c.h5", arch=arch, weights="none", precision=precision,
                                batch_size=batch, workers=args.workers, device=args.device,
                                progress=False, log=lambda m: None)
                return r.images_per_s

            ceilings, exts, ratios = [], [], []
            before = ceiling(arch, precision, batch, n_images, device)
            for _ in range(args.repeats):  # each extract between two ceilings: both see the same machine
                exts.append(run_extract())
                after = ceiling(arch, precision, batch, n_images, device)
                ratios.append(exts[-1] / ((before + after) / 2))
                ceilings.append(after)
                before = after
            ext, ceil, ratio = max(exts), max(ceilings), statistics.median(ratios)
            bound = dec / (dec + ceil) if device.type == "cpu" else 1.0
            speedup = ext / tut
            rows.append((ratio, speedup))
            print(f"{arch:10} {precision:5} {ext:9.1f} {ceil:9.1f} {ratio:6.2f} {bound:6.2f} {tut:9.1f} {speedup:7.1f}x",
                  flush=True)
    print("images/s (best of the repeats); ratio = median of extract / ceiling around it (target >= 0.85);")
    print("bound = decode / (decode + ceiling): the best ratio when decoding shares the network's cores;")
    print("speed-up = extract / tutorial (target >= 5x)")
    print(f"worst ratio {min(r for r, _ in rows):.2f}, worst speed-up {min(s for _, s in rows):.1f}x")


if __name__ == "__main__":
    main()
