"""Extraction throughput vs the model-only ceiling and a tutorial-style loop, in one run.

    python bench/extract_speed.py [--data DIR] [--arch resnet18,resnet50] [--precisions fp32,bf16]
                                  [--device cuda] [--save]
    python bench/extract_speed.py --fixed-cost [--arch resnet50] [--save]

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
  command   images/s of the whole `python -m cnncodes extract` process (start-up, model
            build, loop, final write), and its fixed cost: wall time minus the extraction
            loop the command reports (median of 3 runs)
--fixed-cost measures only that fixed cost (median of --command-runs, on --fixed-cost-images
real photos), beside its target (<= 2.5 s for resnet50 on CPU) and taken apart into start-up
stages (bench/startup_stages.py, medians too); --save writes bench/results/extract_fixed_cost.json.
On CUDA the decode line is printed twice: CPU workers (`make_loader`) and nvJPEG on the
device (`gpu_decode.DeviceLoader`, what `extract --decode auto` uses there).
`--save` writes bench/results/extract_speed.json (extract_speed-cuda.json on CUDA; `python
bench/report.py` renders it into docs/benchmarks.md) and the printout beside it as .txt.
A shared machine is noisy (the ceiling alone moves by 20% from one minute to the next), so
every extract run sits between two ceiling runs: ratio = the median over --repeats (>= 3) of
extract / mean(ceiling before, ceiling after); every images/s shown is a median of --repeats.
Each arch runs at its own crop (the weights' preprocessing, as `extract` resolves it).
Targets: extract >= 0.85 x ceiling, and >= 5 x tutorial.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (default_data, forward_ceiling, hardware, load_average, results_header, timed,  # noqa: E402
                    write_results)

from cnncodes.backbones import create_backbone, create_extractor, resolve_preprocessing, resolve_weights  # noqa: E402
from cnncodes.data import ImageFiles, Preprocessing, discover, make_loader  # noqa: E402
from cnncodes.extract import ViewMaker, extract  # noqa: E402
from cnncodes.gpu_decode import DeviceLoader  # noqa: E402
from cnncodes.runtime import configure_threads, inference_batch_size, resolve_device  # noqa: E402


def preprocessing(arch: str) -> Preprocessing:
    """The arch's default preprocessing, as `extract --weights none` resolves it."""
    return resolve_preprocessing(arch, resolve_weights(arch, "none"))


def ceiling(arch: str, precision: str, batch: int, images: int, device: torch.device) -> float:
    """Images/s of the extractor model alone on synthetic, pre-normalised tensors (channels_last)."""
    model, _, _ = create_extractor(arch, "none")
    model = model.to(device, memory_format=torch.channels_last)
    return forward_ceiling(model, batch, preprocessing(arch).crop, precision, True, device, images)


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


def device_decode(data: Path, batch: int, device: torch.device) -> float:
    """Images/s of the device decode path alone: threads read bytes, nvJPEG decodes, views on the device."""
    layout = discover(data)
    paths = [f.path for split in layout.splits.values() for f in split]
    pre = Preprocessing()
    loader = DeviceLoader(layout.root, paths, pre.load, ViewMaker(pre, paths, 0, 0), batch, device,
                          threads=max(1, (os.cpu_count() or 2) - 1))
    seconds, n = timed(lambda: sum(len(b.indices) for b in loader))
    return n / seconds


FIXED_COST_TARGET_S = 2.5  # issue 24: resnet50's whole-command fixed cost on the 2-core CPU


def command(data: Path, arch: str, precision: str, device: str, runs: int = 3,
            fixed_runs: list[float] | None = None) -> tuple[float, float]:
    """(images/s of the whole `cnncodes extract` process, its fixed cost in s): medians of `runs`;
    each run's fixed cost is appended to `fixed_runs` when given."""
    rates, fixed = [], []
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, "-m", "cnncodes", "extract", str(data), "-o", f"{tmp}/c.h5", "--arch", arch,
                    "--weights", "none", "--precision", precision, "--device", device, "-q"]
            start = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
            wall = time.perf_counter() - start
        images = int(out.split("extracted ")[1].split()[0])
        loop = float(out.split(" codes) in ")[1].split()[0])
        rates.append(images / wall)
        fixed.append(wall - loop)
    if fixed_runs is not None:
        fixed_runs.extend(round(f, 2) for f in fixed)
    return statistics.median(rates), statistics.median(fixed)


def startup_stages(arch: str, device: str, runs: int) -> dict[str, float]:
    """Median seconds of each start-up stage (bench/startup_stages.py, a fresh process per run)."""
    script = Path(__file__).resolve().parent / "startup_stages.py"
    samples = [json.loads(subprocess.run([sys.executable, str(script), "--arch", arch, "--device", device],
                                         capture_output=True, text=True, check=True).stdout.splitlines()[-1])
               for _ in range(runs)]
    return {k: round(statistics.median(s[k] for s in samples), 3) for k in samples[0]}


def sample_folder(data: Path, images: int, into: Path) -> Path:
    """A folder of symlinks to the first `images` photos of `data` (its class layout kept)."""
    layout = discover(data)
    files = [f for split in layout.splits.values() for f in split][:images]
    for f in files:
        link = into / Path(f.path).parent.name / Path(f.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((layout.root / f.path).resolve())
    return into


def fixed_cost(args, data: Path, say) -> dict:
    """The whole command's fixed cost per arch (median of --command-runs) and its start-up stages."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = sample_folder(data, args.fixed_cost_images, Path(tmp))
        for arch in args.archs.split(","):
            runs: list[float] = []
            _, fixed = command(folder, arch, "fp32", args.device, args.command_runs, runs)
            stages = startup_stages(arch, "cuda" if args.device.startswith("cuda") else "cpu", args.command_runs)
            verdict = f" (target <= {FIXED_COST_TARGET_S} s)" if arch == "resnet50" else ""
            say(f"fixed cost of `cnncodes extract --arch {arch} --weights none`: {fixed:.2f} s, median of "
                f"{runs}{verdict}")
            for name, seconds in stages.items():
                say(f"  {name:40} {seconds:6.2f} s")
            rows[arch] = {"fixed_s": round(fixed, 2), "runs_s": runs, "stages_s": stages}
    return rows


def tutorial(arch: str, data: Path, images: int, device: torch.device) -> float:
    """Images/s of the tutorial-style loop (its transforms, batch 4, 4 workers, fp32, NCHW, BN unfolded)."""
    pre = preprocessing(arch)
    tf = transforms.Compose([
        transforms.Resize(pre.resize), transforms.CenterCrop(pre.crop), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    roots = [data / s for s in ("train", "val") if (data / s).is_dir()] or [data]
    dataset = torch.utils.data.ConcatDataset([torchvision.datasets.ImageFolder(r, tf) for r in roots])
    subset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=4, shuffle=False, num_workers=4)
    model = create_backbone(arch, "none").headless().eval().to(device)

    def run() -> int:
        n = 0
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
                n += len(x)
        return n

    seconds, n = timed(run)
    return n / seconds


def median(repeats: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--arch", "--archs", dest="archs", default="resnet18,resnet50", help="comma-separated list")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's (16 on CPU, 128 on CUDA)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement (median; at least 3)")
    p.add_argument("--tutorial-images", type=int, default=160, help="images timed for the slow tutorial loop")
    p.add_argument("--command-runs", type=int, default=3, help="whole-command runs per arch and precision (median)")
    p.add_argument("--fixed-cost", action="store_true", help="measure only the whole command's fixed cost, in stages")
    p.add_argument("--fixed-cost-images", type=int, default=32, help="photos the --fixed-cost commands extract")
    p.add_argument("--save", action="store_true", help="also write the report under bench/results/")
    args = p.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    data = args.data or default_data()
    device = resolve_device(args.device)
    configure_threads(device)
    batch = args.batch_size or inference_batch_size(device)
    n_images = sum(len(v) for v in discover(data).splits.values())
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (medians of fewer runs are not reported)")
    if args.fixed_cost:
        if args.command_runs < 3:
            p.error("--command-runs must be at least 3 (medians of fewer runs are not reported)")
        result = results_header("extract_fixed_cost" + ("-cuda" if device.type == "cuda" else ""))
        say(f"data: {args.fixed_cost_images} photos of {data}; {hardware()}; load {load_average()}")
        result["fixed_cost"] = fixed_cost(args, data, say)
        result["notes"] = ["fixed cost = wall time of the whole `python -m cnncodes extract` process minus the "
                           "extraction loop it reports; stages from bench/startup_stages.py (medians), which do "
                           "not include the interpreter's own start"]
        if args.save:
            out = Path(__file__).resolve().parent / "results" / f"{result['bench']}.json"
            write_results(result, out)
            print(f"wrote {out}")
        return
    result = results_header("extract_speed-cuda" if device.type == "cuda" else "extract_speed")
    say(f"data: {data} ({n_images} images); batch {batch}; median of {args.repeats}; {hardware()}")
    dec = median(args.repeats, lambda: decode(data, batch, args.workers, device))
    say(f"decode (loader alone, CPU workers): {dec:.1f} img/s")
    if device.type == "cuda":
        say(f"decode (nvJPEG + views on the GPU): {median(args.repeats, lambda: device_decode(data, batch, device)):.1f} img/s")
    say(f"{'arch':10} {'prec':5} {'extract':>9} {'ceiling':>9} {'ratio':>6} {'bound':>6} {'tutorial':>9} {'speed-up':>8}"
        f" {'command':>8} {'fixed s':>7}")
    rows, table = [], []
    for arch in args.archs.split(","):
        tut = median(args.repeats, lambda: tutorial(arch, data, args.tutorial_images, device))
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
            ext, ceil, ratio = statistics.median(exts), statistics.median(ceilings), statistics.median(ratios)
            bound = dec / (dec + ceil) if device.type == "cpu" else 1.0
            speedup = ext / tut
            rows.append((ratio, speedup))
            cmd_rate, cmd_fixed = command(data, arch, precision, args.device, args.command_runs)
            say(f"{arch:10} {precision:5} {ext:9.1f} {ceil:9.1f} {ratio:6.2f} {bound:6.2f} {tut:9.1f} {speedup:7.1f}x"
                f" {cmd_rate:8.1f} {cmd_fixed:7.2f}")
            table.append([arch, precision, f"{ext:.1f}", f"{ceil:.1f}", f"{ratio:.2f}", f"{bound:.2f}", f"{tut:.1f}",
                          f"{speedup:.1f}x", f"{cmd_rate:.1f}", f"{cmd_fixed:.2f}"])
    say("images/s (median of the repeats); ratio = median of extract / ceiling around it (target >= 0.85);")
    say("bound = decode / (decode + ceiling): the best ratio when decoding shares the network's cores;")
    say("speed-up = extract / tutorial (target >= 5x); command = images / wall time of the whole process,")
    say("fixed s = its wall time minus the extraction loop (medians of --command-runs)")
    say(f"worst ratio {min(r for r, _ in rows):.2f}, worst speed-up {min(s for _, s in rows):.1f}x")
    if args.save:
        out = Path(__file__).resolve().parent / "results" / f"{result['bench']}.json"
        result["table"] = {"columns": ["arch", "precision", "extract img/s", "ceiling img/s", "ratio", "bound",
                                       "tutorial img/s", "speed-up", "command img/s", "fixed s"], "rows": table}
        result["notes"] = [f"{n_images} images of {data.name}, batch {batch}, --weights none (same speed as real "
                           f"weights), median of {args.repeats} runs; decode alone {dec:.1f} img/s",
                           " ".join(lines[-5:-1]), lines[-1]]  # the legend as one note, then the worst figures
        write_results(result, out, lines)
        print(f"wrote {out} and {out.with_suffix('.txt').name}")


if __name__ == "__main__":
    main()
