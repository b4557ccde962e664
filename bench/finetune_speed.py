"""Fine-tuning throughput on real JPEGs vs the ceiling of the same train step on in-memory tensors.

    python bench/finetune_speed.py --arch resnet18 --precision fp32 --batch-size 32 --steps 8

Both figures come from one process, one model, and the same `TrainStep` (uint8 batch ->
normalise on the device -> forward, backward, optimizer step; same arch, precision, batch
size and channels_last): the ceiling feeds a synthetic batch already in memory, the
pipeline runs `cnncodes.finetune.train_epoch` on the image folder (decode, random crop,
flip, collate, loader start-up included). Ratio = pipeline / ceiling; target >= 0.85.
The two alternate for --rounds rounds and the median ratio is reported, so a burst of
load from another process skews one round, not the result.
Uses ../shared/data/hymenoptera_data when present, else writes a small JPEG folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnncodes import backbones, data, distributed, runtime
from cnncodes.finetune import (
    Recipe,
    TrainStep,
    determinism,
    loss_function,
    setup_run,
    train_epoch,
)

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


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


def ceiling(step: TrainStep, batch: int, crop: int, steps: int, device: torch.device) -> float:
    """Images/s of the train step alone, on a uint8 batch already in memory (pinned on CUDA)."""
    images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def pipeline(run, steps: int) -> float:
    """Images/s of the real fine-tuning loop for `steps` batches (epochs restart as in training)."""
    images, seconds, epoch = 0, 0.0, 0
    per_epoch = -(-len(run.train.dataset) // run.recipe.batch_size)
    while steps > 0:
        sums, s = train_epoch(run, epoch, max_steps=min(steps, per_epoch))
        images, seconds, steps, epoch = images + sums.count, seconds + s, steps - per_epoch, epoch + 1
    return images / seconds


def decode_ms(run, n: int = 16) -> float:
    """Milliseconds per image to decode + random-crop in this process (one thread)."""
    ds = run.train.dataset
    start = time.perf_counter()
    for i in range(min(n, len(ds))):
        ds[i]
    return 1000 * (time.perf_counter() - start) / min(n, len(ds))


@click.command()
@click.option("--arch", default="resnet18", type=click.Choice(list(backbones.ARCHS)), show_default=True)
@click.option("--precision", default="fp32", type=click.Choice(runtime.PRECISIONS), show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Timed steps per round for each of ceiling and pipeline.")
@click.option("--rounds", default=3, show_default=True, help="Alternating ceiling/pipeline rounds.")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps first.")
@click.option("--workers", type=int, default=None, help="Decode workers [default: what finetune uses].")
@click.option("--image-size", type=int, default=None, help="Crop size [default: the arch's 224].")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None, help="Image folder [default: hymenoptera].")
@click.option("--device", default="auto", show_default=True)
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
def main(arch, precision, batch_size, steps, rounds, warmup, workers, image_size, data_dir, device, channels_last):
    dev = runtime.resolve_device(device)
    runtime.check_precision(precision, dev)
    distributed.configure_threads(dev)
    with tempfile.TemporaryDirectory() as tmp, determinism(False, dev):
        if data_dir is None:
            data_dir = HYMENOPTERA if HYMENOPTERA.is_dir() else generated_folder(Path(tmp) / "data")
        layout = data.discover(data_dir)
        prep = backbones.default_preprocessing(arch, backbones.resolve_weights(arch, "none"))
        if image_size:
            prep = data.Preprocessing.for_image_size(image_size, prep)
        recipe = Recipe(arch, "none", tuple(layout.classes), prep.to_dict(), epochs=1, batch_size=batch_size,
                        lr=1e-3, head_lr_mult=1.0, weight_decay=0.0, optimizer="sgd", lr_step=7, lr_gamma=0.1,
                        freeze=(), precision=precision, channels_last=channels_last, seed=0, deterministic=False,
                        select_best_on_val=False, world_size=1)
        run = setup_run(layout, None, recipe, "none", prep, dev, workers, progress=False)
        step = TrainStep(run.trainer, run.normalize, run.optimizer, run.scaler, dev, precision,
                         loss_function(False, dev))
        run.model.train()
        ceiling(step, batch_size, prep.crop, warmup, dev)
        print(f"{arch} {precision} batch {batch_size} crop {prep.crop} on {dev} ({torch.get_num_threads()} threads, "
              f"{run.workers} decode workers); data {data_dir} ({len(run.train.dataset)} train images)", flush=True)
        print(f"decode+crop: {decode_ms(run):.1f} ms/image in one thread", flush=True)
        ceilings, pipes = [], []
        for r in range(rounds):
            ceilings.append(ceiling(step, batch_size, prep.crop, steps, dev))
            pipes.append(pipeline(run, steps))
            print(f"round {r + 1}: ceiling {ceilings[-1]:.1f} img/s, fine-tuning {pipes[-1]:.1f} img/s, "
                  f"ratio {pipes[-1] / ceilings[-1]:.3f}  (load avg {os.getloadavg()[0]:.1f})", flush=True)
    ratios = sorted(p / c for p, c in zip(pipes, ceilings))
    print(f"median: ceiling {np.median(ceilings):.1f} img/s, fine-tuning {np.median(pipes):.1f} img/s, "
          f"ratio {ratios[len(ratios) // 2]:.3f} of the ceiling (target >= 0.85)")


if __name__ == "__main__":
    main()
