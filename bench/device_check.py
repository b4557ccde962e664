"""The device check: everything the GPU path claims, measured in one run the moment a GPU is there.

    python bench/device_check.py [--photos .devdata/hymenoptera_data] [--images 8000] [--out PATH]

Under 8 minutes on one GPU (each part has a size option; `SIZES`). In order:
  tests     the test suite with CUDA visible (tests that take a device run on 'cuda' too)
  views     device-decoded vs CPU-decoded (PIL) eval views, on the photos and on generated JPEGs
            (EXIF orientations 1-8, grayscale, CMYK, progressive, 4:2:0, 4:4:4, a large photo):
            max and mean grey-level difference, and the codes' relative difference (resnet50)
  rates     resnet50 bf16 on --images images (the photos replicated by symlinks): model-only
            ceiling, CPU-worker decode rate, device decode rate, and the whole `cnncodes extract`
            command with --decode cpu and --decode gpu: loop img/s and fixed cost (medians of 3)
  finetune  bench/finetune_speed.py: fine-tuning img/s against its forward+backward ceiling
  head      `cnncodes fit-head --clf linear` on the GPU, on the cache the gpu command wrote
Writes bench/results/device_check.json (--out elsewhere); the commit that records a passing
check on a real GPU may set extract.config.GPU_DECODE_MEASURED (the default --decode auto).
Without CUDA it is a smoke run (on one core; 30-40 s on the 2-core dev VM): the CPU parts at small sizes
(the device path on the CPU through the same torchvision call, no nvJPEG), printing exactly what it
skipped; it writes to a temporary file (or --out), never to device_check.json, the record of a GPU.
Without the photos (or with --photos none) the views and rates use the generated JPEGs only.
Targets (one H100): extraction loop >= 0.85 x min(ceiling, device decode rate); fixed cost <= 3 s;
the suite green; device vs CPU views within 1 grey level on average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the device machine runs the working tree, not an installed cnncodes
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HYMENOPTERA, RESULTS, forward_ceiling, hardware, results_header, timed, write_results  # noqa: E402

from cnncodes.backbones import create_extractor, resolve_preprocessing, resolve_weights  # noqa: E402
from cnncodes.data import ImageFiles, Normalize, discover, make_loader  # noqa: E402
from cnncodes.extract.runner import ViewMaker  # noqa: E402
from cnncodes.gpu_decode import DeviceLoader  # noqa: E402
from cnncodes.runtime import available_cores  # noqa: E402

ARCH, PRECISION = "resnet50", "bf16"
PHOTOS = (ROOT / ".devdata" / "hymenoptera_data", HYMENOPTERA)
RECORD = RESULTS / "device_check.json"  # a real GPU's run only
# Each part's size: (the full run, the default on CUDA; the smoke run without CUDA, <= 2 min on 2 cores; what).
SIZES = {
    "images": (8000, 64, "images of the rate measurements (photos replicated)"),
    "compare_photos": (400, 16, "photos whose views are compared"),
    "batch_size": (256, 16, "batch size of the rates"),
    "command_runs": (3, 1, "runs of each extract command (median)"),
    "finetune_steps": (20, 2, "fine-tuning steps"),
    "finetune_batch": (128, 8, "fine-tuning batch size"),
}


# --------------------------------------------------------------------------- inputs


def generated_jpegs(root: Path) -> list[str]:
    """The JPEG kinds a device decoder may treat differently from libjpeg-turbo."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:420]
    base = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.normal(0, 12, (300, 420, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    kinds = {f"exif{k}.jpg": {"exif": k} for k in range(1, 9)}
    kinds.update({"gray.jpg": {"mode": "L"}, "cmyk.jpg": {"mode": "CMYK"}, "progressive.jpg": {"progressive": True},
                  "420.jpg": {"subsampling": 2}, "444.jpg": {"subsampling": 0}, "large.jpg": {"size": (2400, 1800)}})
    root.mkdir(parents=True, exist_ok=True)
    for name, kind in kinds.items():
        im = img.resize(kind["size"]) if "size" in kind else img
        im = im.convert(kind["mode"]) if "mode" in kind else im
        kw = {"quality": 90, "progressive": kind.get("progressive", False)}
        if "subsampling" in kind:
            kw["subsampling"] = kind["subsampling"]
        if "exif" in kind:
            exif = Image.Exif()
            exif[0x0112] = kind["exif"]
            kw["exif"] = exif
        im.save(root / name, **kw)
    return sorted(kinds)


def sources(photos: Path | None, generated: Path, kinds: list[str]) -> list[tuple[Path, str]]:
    """(file, class) of the images the rates replicate: the photos (every split), else the generated JPEGs
    in two classes (a head needs two)."""
    if photos is None:
        return [(generated / name, f"kind{k % 2}") for k, name in enumerate(kinds)]
    layout = discover(photos)
    return [((layout.root / f.path).resolve(), Path(f.path).parent.name) for split in layout.splits.values()
            for f in split]


def replicated(files: list[tuple[Path, str]], images: int, into: Path) -> Path:
    """`images` files: `files` linked again and again under into/train/<class>/."""
    files = list(files)
    random.Random(0).shuffle(files)  # every class in any prefix: a small --images still has them all
    for n in range(images):
        path, label = files[n % len(files)]
        link = into / "train" / label / f"r{n // len(files)}_{path.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return into


# --------------------------------------------------------------------------- parts


def run_tests(timeout: int) -> dict:
    """The suite with CUDA visible, in parallel (xdist), stopped after `timeout` s."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["-n", "auto"] if importlib.util.find_spec("xdist") else ["-o", "addopts="]  # the repo's addopts use -n
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"stopped after {timeout} s", "seconds": timeout}
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), "")
    return {"passed": proc.returncode == 0, "summary": summary.strip("= "), "seconds": round(time.perf_counter() - start, 1),
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]}


def compare_views(root: Path, names: list[str], dev: torch.device, weights: str, threads: int) -> dict:
    """Per image: max/mean |device view - CPU view| (grey levels) and the codes' relative difference."""
    info = resolve_weights(ARCH, weights)
    pre = resolve_preprocessing(ARCH, info)
    maker = ViewMaker(pre, names, 0, 0)
    cpu = {i: t for i, t, err in (ImageFiles(root, names, pre.load, maker)[i] for i in range(len(names))) if err is None}
    loader = DeviceLoader(root, names, pre.load, maker, 32, dev, threads)
    device = {i: t for b in loader for i, t in zip(b.indices.tolist(), b.images.cpu())}
    both = sorted(set(cpu) & set(device))
    diffs = {names[i]: (device[i][0].int() - cpu[i][0].int()).abs().float() for i in both}
    model, _, _ = create_extractor(ARCH, info)
    model = model.to(dev, memory_format=torch.channels_last)
    normalize = Normalize(pre.mean, pre.std).to(dev)
    rel = {}
    with torch.inference_mode():
        for i in both:  # fp32: the difference the decoders make, not bf16's rounding
            a, b = (model(normalize(v[0][None].to(dev))).float().cpu() for v in (device[i], cpu[i]))
            rel[names[i]] = float((a - b).norm() / b.norm().clamp_min(1e-12))
    return {
        "images": len(both), "missing": sorted(set(names) - {names[i] for i in both}),
        "fallbacks": dict(loader.stats.reasons),
        "max_grey": max(float(d.max()) for d in diffs.values()),
        "mean_grey": float(np.mean([float(d.mean()) for d in diffs.values()])),
        "worst": sorted(((n, round(float(d.mean()), 3), int(d.max())) for n, d in diffs.items()), key=lambda r: -r[1])[:8],
        "codes_rel_diff_median": float(np.median(list(rel.values()))), "codes_rel_diff_max": max(rel.values()),
    }


def decode_rate(folder: Path, batch: int, dev: torch.device, on_device: bool, threads: int) -> float:
    """Images/s of a loader alone (decode, resize, crop; no network): CPU workers, or the device path."""
    layout = discover(folder)
    paths = [f.path for split in layout.splits.values() for f in split]
    pre = resolve_preprocessing(ARCH, resolve_weights(ARCH, "none"))
    maker = ViewMaker(pre, paths, 0, 0)
    if on_device:
        loader = DeviceLoader(layout.root, paths, pre.load, maker, batch, dev, threads)
    else:
        loader = make_loader(ImageFiles(layout.root, paths, pre.load, maker), batch, None, dev)
    seconds, n = timed(lambda: sum(len(b.indices) for b in loader))
    return n / seconds


def run_command(folder: Path, out: Path, decode: str, device: str, runs: int) -> dict:
    """The whole `cnncodes extract` process `runs` times: loop img/s and fixed cost (wall - loop), medians."""
    loops, fixed, lines = [], [], []
    for _ in range(runs):
        for p in (out, out.with_name(out.name + ".parts")):
            subprocess.run(["rm", "-rf", str(p)], check=True)
        argv = [sys.executable, "-m", "cnncodes", "extract", str(folder), "-o", str(out), "--arch", ARCH,
                "--weights", "none", "--precision", PRECISION, "--device", device, "--decode", decode, "-q"]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        m = re.search(r"extracted (\d+) images .* in ([\d.]+) s", proc.stdout)
        images, loop = int(m.group(1)), float(m.group(2))
        loops.append(images / loop)
        fixed.append(wall - loop)
        lines.append((proc.stdout + proc.stderr).strip().splitlines()[-1])
    return {"loop_img_s": round(statistics.median(loops), 1), "fixed_s": round(statistics.median(fixed), 2),
            "fixed_runs_s": [round(f, 2) for f in fixed], "last_line": lines[-1]}


def finetune(folder: Path, device: str, steps: int, batch: int) -> dict:
    """bench/finetune_speed.py's pipeline and ceiling figures (resnet50 bf16)."""
    argv = [sys.executable, str(ROOT / "bench" / "finetune_speed.py"), "--arch", ARCH, "--precision", PRECISION,
            "--batch-size", str(batch), "--steps", str(steps), "--data", str(folder), "--device", device]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    text = proc.stdout + proc.stderr
    ceil = re.findall(r"ceiling[^\d]*([\d.]+) img/s", text)
    pipe = re.findall(r"fine-tuning[^\d]*([\d.]+) img/s", text)
    if proc.returncode != 0 or not ceil or not pipe:
        return {"error": (text.strip().splitlines() or ["?"])[-1]}
    return {"finetune_img_s": float(pipe[-1]), "ceiling_img_s": float(ceil[-1]),
            "ratio": round(float(pipe[-1]) / float(ceil[-1]), 3)}


def fit_head(cache: Path, device: str) -> dict:
    argv = [sys.executable, "-m", "cnncodes", "fit-head", str(cache), "-o", str(cache.with_suffix(".head.h5")),
            "--clf", "linear", "--device", device]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    last = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 1), "last_line": last}


# --------------------------------------------------------------------------- main


def fail(message: str) -> None:
    """Bad input: one line, exit 2."""
    print(f"device_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(cuda: bool) -> argparse.Namespace:
    """The options; a size left out is the full run's on CUDA and the smoke run's without (`SIZES`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=None, help="the ants/bees folder, or 'none' for the generated JPEGs only "
                                                  "[default: .devdata/hymenoptera_data, else ../shared/data/...]")
    for key, (full, small, text) in SIZES.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"{text} [default: {full} on CUDA, {small} without]")
    p.add_argument("--weights", default="none", help="resnet50 weights for the codes' difference (a .pth file)")
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=None,
                   help="run the test suite [default: on CUDA only]")
    p.add_argument("--test-timeout", type=int, default=240)
    p.add_argument("--out", type=Path, default=None, help=f"results file [default: {RECORD.relative_to(ROOT)} on "
                                                          f"CUDA; without CUDA a temporary file]")
    args = p.parse_args()
    for key, (full, small, _) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, full if cuda else small)
    if args.photos == "none":
        args.photos = None
    elif args.photos is not None:
        args.photos = Path(args.photos)
        if not args.photos.is_dir():
            fail(f"--photos {args.photos}: no such folder (pass the hymenoptera_data folder, or none)")
    else:
        args.photos = next((d for d in PHOTOS if d.is_dir()), None)
    if args.tests is None:
        args.tests = cuda
    if not cuda and args.out is not None and args.out.resolve() == RECORD.resolve():
        fail(f"{RECORD.relative_to(ROOT)} records a run on a GPU; without CUDA pass another --out")
    return args


def one_core() -> str:
    """Pin this process, and so the commands it runs (cnncodes sizes its threads by the affinity), to one core.

    A smoke run: on a shared machine a second torch thread stalls at every parallel region while another
    process holds its core (2-4x the CPU time, 3-10x the wall time measured on the 2-core dev VM)."""
    if not hasattr(os, "sched_setaffinity"):
        return "all cores (this OS cannot pin)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return f"core {core} only, one thread"


def check_views(result: dict, args: argparse.Namespace, tmp: Path, dev: torch.device, threads: int) -> list[str]:
    """Device vs CPU views on the generated JPEGs and the photos; returns the generated names."""
    kinds = generated_jpegs(tmp / "generated")
    result["views_generated"] = compare_views(tmp / "generated", kinds, dev, args.weights, threads)
    if args.photos is not None:
        layout = discover(args.photos)
        photos = [f.path for split in layout.splits.values() for f in split][:args.compare_photos]
        result["views_photos"] = compare_views(layout.root, photos, dev, args.weights, threads)
    for key in ("views_generated", "views_photos"):
        if key in result:
            v = result[key]
            print(f"{key}: {v['images']} images, grey levels max {v['max_grey']:.0f} mean {v['mean_grey']:.3f}; codes "
                  f"rel. diff median {v['codes_rel_diff_median']:.2e} max {v['codes_rel_diff_max']:.2e}; "
                  f"fallbacks {v['fallbacks']}")
    return kinds


def check_rates(result: dict, args: argparse.Namespace, folder: Path, dev: torch.device, threads: int) -> None:
    """Model ceiling, CPU and device decode rates, and the whole extract command (--decode gpu on CUDA)."""
    model, _, _ = create_extractor(ARCH, "none")
    model = model.to(dev, memory_format=torch.channels_last)
    crop = resolve_preprocessing(ARCH, resolve_weights(ARCH, "none")).crop
    batch = args.batch_size
    rates = {"ceiling_img_s": statistics.median(forward_ceiling(model, batch, crop, PRECISION, True, dev, args.images)
                                                 for _ in range(3))}
    del model
    rates["cpu_decode_img_s"] = decode_rate(folder, batch, dev, False, threads)
    rates["device_decode_img_s"] = decode_rate(folder, batch, dev, True, threads)
    tmp = folder.parent
    rates["command_cpu_decode"] = run_command(folder, tmp / "cpu.h5", "cpu", dev.type, args.command_runs)
    if dev.type == "cuda":
        rates["command_gpu_decode"] = run_command(folder, tmp / "gpu.h5", "gpu", dev.type, args.command_runs)
    result["rates"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in rates.items()}
    for k, v in result["rates"].items():
        print(f"{k}: {v}")


def skips(args: argparse.Namespace, cuda: bool, cores: str) -> list[str]:
    """What this run leaves out, and why."""
    out = [] if args.tests else ["the test suite (default on CUDA only; --tests runs it)"]
    if args.photos is None:
        out.append(f"the photos (--photos none, or none at {' or '.join(str(d) for d in PHOTOS)}): the views and "
                   f"rates use the generated JPEGs only")
    if not cuda:
        out += ["nvJPEG: the views come from the device path run on the CPU (libjpeg-turbo through the same "
                "torchvision call, EXIF applied by cnncodes), not from a GPU",
                "the device decode rate on a GPU (the figure is the device path on the CPU)",
                "`cnncodes extract --decode gpu` (needs CUDA)",
                "fine-tuning and the head fit on a GPU (run on the CPU)",
                "the full sizes (no CUDA: a smoke run at " + ", ".join(
                    f"{k.replace('_', '-')} {getattr(args, k)}" for k in SIZES) + f", on {cores})"]
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    args = parse_args(cuda)
    dev = torch.device("cuda" if cuda else "cpu")
    cores = "all cores" if cuda else one_core()
    threads = max(1, available_cores() - 1)
    result = results_header("device_check" if cuda else "device_check-cpu-mode")
    result["sizes"] = {k: getattr(args, k) for k in SIZES}
    result["photos"] = str(args.photos) if args.photos else None
    seconds = result["seconds"] = {}
    started = time.perf_counter()
    print(f"{hardware()}; device {dev}; runs on {cores}; photos {args.photos or 'none: the generated JPEGs only'}")

    def lap(part: str) -> None:
        nonlocal started
        seconds[part] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    if args.tests:
        result["tests"] = run_tests(args.test_timeout)
        print(f"tests: {result['tests']['summary']}")
        lap("tests")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kinds = check_views(result, args, tmp, dev, threads)
        lap("views")
        folder = replicated(sources(args.photos, tmp / "generated", kinds), args.images, tmp / "replicated")
        check_rates(result, args, folder, dev, threads)
        lap("rates")
        result["finetune"] = finetune(folder, dev.type, args.finetune_steps, args.finetune_batch)
        print(f"finetune: {result['finetune']}")
        lap("finetune")
        cache = tmp / ("gpu.h5" if cuda else "cpu.h5")
        result["head"] = fit_head(cache, dev.type) if cache.exists() else {"ok": False, "last_line": "no cache"}
        print(f"head on {dev.type}: {result['head']}")
        lap("head")
    result["targets"] = targets(result, cuda)
    result["skipped"] = skips(args, cuda, cores)
    for name, ok in result["targets"].items():
        print(f"target {name}: {ok}")
    print(f"seconds: {seconds}")
    print("skipped:" + "".join(f"\n  - {s}" for s in result["skipped"]) if result["skipped"] else "skipped: nothing")
    out = args.out or (RECORD if cuda else Path(tempfile.gettempdir()) / "device_check-cpu-mode.json")
    write_results(result, out)
    print(f"wrote {out}")


def targets(r: dict, cuda: bool) -> dict:
    """The issue's targets, True/False (None where this run could not measure them)."""
    rates = r["rates"]
    gpu = rates.get("command_gpu_decode", {})
    bound = min(rates["ceiling_img_s"], rates["device_decode_img_s"])
    return {
        "suite green": r["tests"]["passed"] if "tests" in r else None,
        "views within 1 grey level on average": all(r[k]["mean_grey"] <= 1 for k in ("views_generated", "views_photos")
                                                    if k in r),
        "loop >= 0.85 x min(ceiling, device decode)": (gpu["loop_img_s"] >= 0.85 * bound) if "loop_img_s" in gpu else None,
        "fixed cost <= 3 s (GPU)": (gpu["fixed_s"] <= 3) if "fixed_s" in gpu else None,
        "head fitted": r["head"].get("ok"),
    }


if __name__ == "__main__":
    main()
