"""Start-up without torch (help, version, argument errors, a no-op rerun) and what each
precision sets. No timings: the assertions are about what gets imported and computed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.precision import PRECISIONS, autocast, check_precision, tf32
from cnncodes.sources import as_source
from cnncodes.uptodate import request_key, up_to_date, weights_sha256

from conftest import make_image, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the CLI in a fresh interpreter, then reports whether torch got imported.
PROBE = """
import sys
from cnncodes.cli import cli
try:
    cli(sys.argv[1:], prog_name="cnncodes")
except SystemExit as e:
    code = e.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code)
"""


def _probe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("extract", "--help"), ("predict", "--help"),
                                  ("finetune", "--help"), ("extract",), ("no-such-command",)],
                         ids=lambda a: "-".join(a))
def test_help_version_and_argument_errors_do_not_import_torch(args):
    proc = _probe(*args)
    assert proc.stdout.strip().splitlines()[-1].split()[0] == "NO_TORCH", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_every_command():
    proc = _probe("--help")
    for name in ("extract", "info", "fit-head", "predict", "export", "finetune", "demo"):
        assert f"  {name} " in proc.stdout


def test_unknown_arch_is_a_clear_error_from_the_api(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 1}, size=32)
    with pytest.raises(CnnCodesError, match="unknown arch 'resnet_nope'"):
        extract(folder, tmp_path / "c.h5", arch="resnet_nope", weights="none", progress=False)


def _run(folder, out, **kw):
    args = {"arch": "resnet18", "weights": "none", "image_size": 32, "precision": "fp32", "views": 0,
            "eval_views": 0, "seed": 0, **kw}
    result = extract(folder, out, **args, progress=False, log=lambda m: None)
    key = request_key(weights_sha256=weights_sha256(args["weights"]), **args)
    return result, key


def test_rerun_on_an_unchanged_folder_does_not_import_torch(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 2, "val": 1}, size=32)
    (folder / "train" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "c.h5"
    _run(folder, out)
    proc = _probe("extract", folder, "-o", out, "--weights", "none", "--image-size", "32", "-q")
    assert "is up to date (train 4, val 2 codes); nothing to extract" in proc.stdout, proc.stdout + proc.stderr
    assert "skipped train/cat/bad.jpg" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].split()[0] == "NO_TORCH"


def test_fast_check_agrees_with_the_full_extract(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 2, "val": 1}, size=32)
    (folder / "val" / "dog" / "bad.jpg").write_bytes(b"")
    (folder / "val" / "dog" / "notes.txt").write_text("x")
    out = tmp_path / "c.h5"
    first, key = _run(folder, out)
    done = up_to_date(as_source(folder), out, key)
    again, _ = _run(folder, out)
    assert again.up_to_date and done is not None
    assert done.split_counts == again.split_counts == first.split_counts
    assert done.skipped == again.skipped
    assert up_to_date(as_source(folder), out, key, strict=True) is None  # --strict refuses the .txt: the full path says so
    assert up_to_date(as_source(folder), out, request_key(**{**_key_args(), "seed": 1})) is None  # another configuration
    make_image(0, 7, 32).save(folder / "train" / "cat" / "new.jpg")  # a new image: work to do
    assert up_to_date(as_source(folder), out, key) is None
    assert not _run(folder, out)[0].up_to_date
    assert up_to_date(as_source(folder), out, key) is not None
    (folder / "train" / "dog" / "000.jpg").unlink()  # a deleted image: the cache must be rewritten
    assert up_to_date(as_source(folder), out, key) is None
    _run(folder, out)
    assert up_to_date(as_source(folder), out, key) is not None
    next(tmp_path.glob("c.shards/val/*.h5")).unlink()  # finished work gone: the full path redoes it
    assert up_to_date(as_source(folder), out, key) is None


def _key_args() -> dict:
    return {"arch": "resnet18", "weights": "none", "weights_sha256": "", "image_size": 32, "precision": "fp32",
            "views": 0, "eval_views": 0, "seed": 0}


def test_a_local_weights_file_is_keyed_by_its_content(tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"one")
    first = weights_sha256(str(w))
    w.write_bytes(b"two")
    assert first and weights_sha256(str(w)) != first
    assert weights_sha256("DEFAULT") == weights_sha256("none") == ""


# --------------------------------------------------------------------------- precision


def test_fp32_turns_tf32_off_inside_and_restores_the_flags():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True  # PyTorch's cuDNN default
        with autocast(torch.device("cpu"), "fp32"):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
        with autocast(torch.device("cpu"), "bf16"):
            assert torch.is_autocast_enabled("cpu") and not cudnn.allow_tf32
        cudnn.allow_tf32 = matmul.allow_tf32 = False
        with tf32(True):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_fp32_restores_the_flags_after_an_error():
    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32
    try:
        cudnn.allow_tf32 = True
        with pytest.raises(ValueError), autocast(torch.device("cpu"), "fp32"):
            raise ValueError
        assert cudnn.allow_tf32
    finally:
        cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_cuda_only_precisions_are_clear_errors_on_cpu(precision):
    assert precision in PRECISIONS
    with pytest.raises(CnnCodesError, match=f"--precision {precision} needs a CUDA device"):
        check_precision(precision, torch.device("cpu"))


def test_unknown_precision_is_refused():
    with pytest.raises(CnnCodesError, match="unknown precision 'fp8'"):
        check_precision("fp8", torch.device("cpu"))


# --------------------------------------------------------------------------- start-up of extract


def test_extract_imports_neither_torch_dynamo_nor_transforms_v2():
    """Both cost ~1 s of every command's start-up; `tvimport` and `imageops` keep them out."""
    code = ("import sys, cnncodes.extract.api, cnncodes.backbones, cnncodes.gpu_decode; "
            "print(sorted(m for m in ('torch._dynamo', 'torchvision.transforms.v2') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_roi_align_still_works_after_the_dynamo_free_import():
    import torchvision

    import cnncodes.tvimport  # noqa: F401

    x = torch.arange(64.0).view(1, 1, 8, 8)
    out = torchvision.ops.roi_align(x, torch.tensor([[0.0, 0, 0, 4, 4]]), 2)
    assert out.shape == (1, 1, 2, 2) and out.min() > 0


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_views_resize_and_crop_as_torchvision_v2_does(interpolation):
    """`imageops` replaces v2's kernels in the views: bit-identical results on the CPU, for CHW
    tensors, HWC-backed ones (from PIL) and batches, growing and shrinking, with and without padding."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from cnncodes import imageops

    mode = InterpolationMode(interpolation)
    g = torch.Generator().manual_seed(0)
    for h, w, short, crop in [(37, 53, 24, 20), (64, 40, 80, 70), (300, 200, 64, 56), (30, 30, 30, 40)]:
        chw = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        hwc = chw.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # strides of a PIL image's tensor
        batch = torch.stack([chw, chw.flip(-1)])
        for img in (chw, hwc, batch):
            want = TF.center_crop(TF.resize(img, [short], interpolation=mode, antialias=True), [crop, crop])
            got = imageops.center_crop(imageops.resize(img, short, interpolation), crop)
            assert got.shape == want.shape and torch.equal(got, want), (h, w, short, crop)
        want = TF.resized_crop(chw, 3, 5, h // 2, w // 3, [crop, crop], interpolation=mode, antialias=True)
        assert torch.equal(imageops.resized_crop(chw, 3, 5, h // 2, w // 3, crop, interpolation), want)
        assert torch.equal(imageops.hflip(chw), TF.horizontal_flip(chw))


@torch.inference_mode()
def test_inplace_folding_is_the_copying_one_without_the_copy():
    """extract folds its freshly built model in place (no copy of the weights); same function."""
    from cnncodes.backbones import create_backbone, fold_batchnorm

    model = create_backbone("resnet18", "none").headless().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics that folding could get wrong
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = model(x)
    copied = fold_batchnorm(model, "resnet18")
    folded = fold_batchnorm(model, "resnet18", inplace=True)
    assert folded is model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.equal(folded(x), copied(x))
    torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_command_that_imported_torch_exits_with_its_code_and_flushed_output(tmp_path):
    """The CLI skips the interpreter's teardown once torch is imported (~1 s): the exit code,
    the output and the cache must be exactly those of a normal exit."""
    data = write_folder(tmp_path / "data", {"train": 1}, size=40)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "cnncodes", "extract", str(data), "-o", str(tmp_path / "c.h5"), "--arch", "resnet18",
            "--weights", "none", "--image-size", "32", "-q"]
    ok = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0 and ok.stdout.startswith("extracted 2 images"), ok.stdout + ok.stderr
    from cnncodes.store import Cache

    with Cache(tmp_path / "c.h5") as c:
        assert c.features("train").shape[0] == 2
    bad = subprocess.run(base + ["--decode", "gpu", "--device", "cpu", "--overwrite"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("use --decode cpu"), bad.stderr


def test_the_exit_joins_running_threads_and_skips_one_still_being_started(monkeypatch):
    """Ctrl-C inside a thread's start() leaves it listed by threading.enumerate but not started: joining it
    raised RuntimeError over the exit code 130 (CI, test_ctrl_c_exits_130_with_resume_hint)."""
    import threading
    import time

    from cnncodes.cli import _join_threads

    done = []
    running = threading.Thread(target=lambda: (time.sleep(0.2), done.append(1)))
    running.start()
    being_started = threading.Thread(target=lambda: None)  # as threading._limbo holds it: listed, not started
    monkeypatch.setattr(threading, "enumerate", lambda: [threading.current_thread(), being_started, running])
    _join_threads()
    assert done == [1]
