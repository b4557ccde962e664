"""Fine-tuning throughput on real JPEGs vs the ceiling of the same train step on in-memory tensors.

    python bench/finetune_speed.py --arch resnet18 --precision fp32 --batch-size 32 --steps 8

Both figures come from one process, one model and the same `TrainStep` (uint8 batch ->
normalise on the device -> forward, backward, optimizer step; same arch, precision, batch
size and channels_last): the ceiling feeds a synthetic batch already in memory, the
pipeline is `cnncodes.finetune.train_epoch` on the image folder (sampler, decode, random
crop, flip, collate, loader start-up, bookkeeping). Ratio = pipeline / ceiling; target >= 0.85.

Timings on a shared machine drift with other users' load, so the two are measured close
together: with inline decoding (--workers 0, the CPU default) every real step is followed
by one synthetic step (`--mode interleaved`), and the median of the per-pair ratios is
reported; with decode workers (which would prefetch during synthetic steps) ceiling and
pipeline alternate in blocks of --steps (`--mode rounds`).
Uses ../shared/data/hymenoptera_data when present, else writes a small JPEG folder.

Measured on the 2-core dev VM (hymenoptera, batch 32, 224 px, inline decoding), median
ratio: resnet18 fp32 0.93-0.95, resnet18 bf16 0.98, resnet50 fp32 0.94, resnet50 bf16
0.95-0.97. With one decode worker beside the 2 compute threads: resnet18 fp32 0.78.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import click
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cnncodes import backbones, data, runtime
from cnncodes.finetune import (
    FinetuneConfig,
    TrainStep,
    determinism,
    loss_function,
    setup_run,
    train_epoch,
)
from cnncodes.finetune import loop as loop_module  # train_epoch builds its TrainStep from this module's global
from cnncodes.finetune.model import set_train_mode
from common import HYMENOPTERA  # noqa: E402


def generated_folder(root: Path, per_class: int = 48) -> Path:
    """Photo-sized (500x375) noisy JPEGs in two classes, like the tutorial's ants/bees."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 255, size=(47, 63, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
            img.save(root / "train" / c / f"{i:03d}.jpg", quality=90)
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch: int, crop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch already in memory (pinned on CUDA, as the loader's batches are)."""
    images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def ceiling(step: TrainStep, batch: tuple[torch.Tensor, torch.Tensor], steps: int, device: torch.device) -> float:
    """Images/s of the train step alone on the in-memory batch."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    _sync(device)
    return len(batch[1]) * steps / (time.perf_counter() - start)


def pipeline(run, steps: int) -> float:
    """Images/s of the real fine-tuning loop for `steps` batches (epochs restart as in training)."""
    images, seconds, epoch = 0, 0.0, 0
    per_epoch = -(-len(run.train.dataset) // run.recipe.batch_size)
    while steps > 0:
        sums, s = train_epoch(run, epoch, max_steps=min(steps, per_epoch))
        images, seconds, steps, epoch = images + sums.count, seconds + s, steps - per_epoch, epoch + 1
    return images / seconds


class _Interleaved(TrainStep):
    """TrainStep that times each real step (from the end of the previous pair, so the loader's
    fetch and the loop's bookkeeping count) and then runs and times one synthetic step."""

    synthetic: ClassVar[tuple[torch.Tensor, torch.Tensor]]
    pairs: ClassVar[list[tuple[int, float, float]]] = []  # (images, pipeline seconds, ceiling seconds)
    mark: ClassVar[float] = 0.0

    def __call__(self, images, labels):
        out = super().__call__(images, labels)
        _sync(self.device)
        t1 = time.perf_counter()
        super().__call__(*self.synthetic)
        _sync(self.device)
        t2 = time.perf_counter()
        _Interleaved.pairs.append((len(labels), t1 - _Interleaved.mark, (t2 - t1) * len(labels) / len(self.synthetic[1])))
        _Interleaved.mark = t2
        return out


def interleaved(run, synthetic, steps: int) -> list[tuple[int, float, float]]:
    """Per-step (images, pipeline s, ceiling s scaled to the same images), real and synthetic alternating."""
    _Interleaved.synthetic, _Interleaved.pairs = synthetic, []
    original, loop_module.TrainStep = loop_module.TrainStep, _Interleaved
    try:
        epoch, per_epoch = 0, -(-len(run.train.dataset) // run.recipe.batch_size)
        while steps > 0:
            _Interleaved.mark = time.perf_counter()  # loader start-up counts against the pipeline
            train_epoch(run, epoch, max_steps=min(steps, per_epoch))
            steps, epoch = steps - per_epoch, epoch + 1
    finally:
        loop_module.TrainStep = original
    if not _Interleaved.pairs:  # the patch missed the module train_epoch reads TrainStep from
        raise RuntimeError("no interleaved steps were timed: train_epoch no longer builds loop.TrainStep")
    return _Interleaved.pairs


def decode_ms(run, n: int = 16) -> float:
    """Milliseconds per image to decode + random-crop in this process (one thread)."""
    ds = run.train.dataset
    start = time.perf_counter()
    for i in range(min(n, len(ds))):
        ds[i]
    return 1000 * (time.perf_counter() - start) / min(n, len(ds))


def _report_interleaved(pairs) -> None:
    ratios = [c / p for _, p, c in pairs]
    n = sum(i for i, _, _ in pairs)
    pipe, top = n / sum(p for _, p, _ in pairs), n / sum(c for _, _, c in pairs)
    print("per-step ratios: " + " ".join(f"{r:.2f}" for r in ratios))
    print(f"ceiling (synthetic, in memory): {top:.1f} img/s")
    print(f"fine-tuning (real JPEGs):       {pipe:.1f} img/s")
    print(f"ratio: {np.median(ratios):.3f} of the ceiling (median of {len(ratios)} interleaved steps; "
          f"{pipe / top:.3f} from the totals; target >= 0.85)")


def _report_rounds(run, step, synthetic, steps: int, rounds: int, device) -> None:
    ceilings, pipes = [], []
    for r in range(rounds):
        ceilings.append(ceiling(step, synthetic, steps, device))
        pipes.append(pipeline(run, steps))
        print(f"round {r + 1}: ceiling {ceilings[-1]:.1f} img/s, fine-tuning {pipes[-1]:.1f} img/s, "
              f"ratio {pipes[-1] / ceilings[-1]:.3f}  (load avg {os.getloadavg()[0]:.1f})", flush=True)
    ratios = [p / c for p, c in zip(pipes, ceilings)]
    print(f"median: ceiling {np.median(ceilings):.1f} img/s, fine-tuning {np.median(pipes):.1f} img/s, "
          f"ratio {np.median(ratios):.3f} of the ceiling (target >= 0.85)")


@click.command()
@click.option("--arch", default="resnet18", show_default=True)
@click.option("--precision", default="fp32", type=click.Choice(runtime.PRECISIONS), show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=8, show_default=True, help="Timed real steps (per round in rounds mode).")
@click.option("--mode", type=click.Choice(["auto", "interleaved", "rounds"]), default="auto", show_default=True,
              help="auto: interleaved with inline decoding, rounds with decode workers.")
@click.option("--rounds", default=3, show_default=True, help="Rounds mode: alternating ceiling/pipeline blocks.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first.")
@click.option("--workers", type=int, default=None, help="Decode workers [default: what finetune uses].")
@click.option("--image-size", type=int, default=None, help="Crop size [default: the arch's 224].")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None, help="Image folder [default: hymenoptera].")
@click.option("--device", default="auto", show_default=True)
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
def main(arch, precision, batch_size, steps, mode, rounds, warmup, workers, image_size, data_dir, device,
         channels_last):
    dev = runtime.resolve_device(device)
    runtime.check_precision(precision, dev)
    with tempfile.TemporaryDirectory() as tmp, determinism(False, dev):
        if data_dir is None:
            data_dir = HYMENOPTERA if HYMENOPTERA.is_dir() else generated_folder(Path(tmp) / "data")
        layout = data.discover(data_dir)
        prep = backbones.default_preprocessing(arch, backbones.resolve_weights(arch, "none"))
        if image_size:
            prep = data.Preprocessing.for_image_size(image_size, prep)
        config = FinetuneConfig(arch=arch, weights="none", epochs=1, batch_size=batch_size, precision=precision,
                                channels_last=channels_last, workers=workers, image_size=image_size)
        recipe = config.recipe("none", layout.classes, prep.to_dict(), world_size=1)
        run = setup_run(layout, None, recipe, "none", prep, dev, workers, progress=False)
        step = TrainStep(run.trainer, run.normalize, run.optimizer, run.scaler, dev, precision,
                         loss_function(False, dev))
        synthetic = synthetic_batch(batch_size, prep.crop, dev)
        set_train_mode(run.model, run.frozen)  # frozen parts (none here) keep their BatchNorm in eval mode
        ceiling(step, synthetic, warmup, dev)
        mode = ("interleaved" if run.workers == 0 else "rounds") if mode == "auto" else mode
        print(f"{arch} {precision} batch {batch_size} crop {prep.crop} on {dev} ({torch.get_num_threads()} threads, "
              f"{run.workers} decode workers, {mode}); data {data_dir} ({len(run.train.dataset)} train images)",
              flush=True)
        print(f"decode+crop: {decode_ms(run):.1f} ms/image in one thread", flush=True)
        if mode == "interleaved":
            _report_interleaved(interleaved(run, synthetic, steps))
        else:
            _report_rounds(run, step, synthetic, steps, rounds, dev)


if __name__ == "__main__":
    main()
