"""Fault injection (issue 6): hostile inputs and crashes, each ending in a clear message or kept data.

Every test asserts the message or the preserved data, not merely that nothing crashed.
Heads, predict, export and finetune have their own bad-input tests beside their features.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_image, write_folder
from PIL import Image

from cnncodes.store import Cache

BASE = ["--weights", "none", "--image-size", "64", "-q"]


def _extract_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cnncodes", "extract", str(data), "-o", str(out), *BASE, "--batch-size", "2",
            "--shard-size", "2", *extra]


def _codes(path: Path) -> dict:
    with Cache(path) as c:
        return {s: (c.features(s)[()], list(c.paths(s)), c.labels(s), c.views(s)) for s in c.splits}


def _same(a: Path, b: Path) -> None:
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys()
    for s in ca:
        assert ca[s][1] == cb[s][1] and np.array_equal(ca[s][2], cb[s][2]) and np.array_equal(ca[s][3], cb[s][3])
        assert np.array_equal(ca[s][0], cb[s][0])


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- hostile inputs


def test_hostile_file_and_class_names(tmp_path, cli):
    root = tmp_path / "data"
    for cls in ("-dash class", "ünïcödé 猫"):
        (root / "train" / cls).mkdir(parents=True)
        for name in ("-leading.jpg", "with space.jpg", "ñame✓.png"):
            make_image(0, len(name)).save(root / "train" / cls / name)
    out = tmp_path / "c.h5"
    r = cli("extract", root, "-o", out, *BASE)
    assert "extracted 6 images" in r.stdout
    with Cache(out) as c:
        assert "train/-dash class/-leading.jpg" in set(c.paths("train"))
        assert c.classes == ["-dash class", "ünïcödé 猫"]


def test_symlink_loop_is_cut_and_reported(tmp_path, cli):
    root = write_folder(tmp_path / "data", {"train": 2})
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "loop")
    r = cli("extract", root, "-o", tmp_path / "c.h5", *BASE)
    assert "extracted 4 images" in r.stdout and "symlink loop" in r.stderr


def test_tiny_and_decompression_bomb_images(tmp_path, cli):
    root = write_folder(tmp_path / "data", {"train": 2})
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "train" / "cat" / "one_pixel.png")
    Image.new("1", (20000, 20000)).save(root / "train" / "cat" / "bomb.png")  # 400 MP, a few KB on disk
    r = cli("extract", root, "-o", tmp_path / "c.h5", *BASE)
    assert "extracted 5 images" in r.stdout
    assert "skipped train/cat/bomb.png: image too large for PIL's decompression-bomb limit" in r.stderr


def test_unreadable_file_is_skipped_with_reason(tmp_path, cli, monkeypatch):
    root = write_folder(tmp_path / "data", {"train": 2})
    secret = root / "train" / "dog" / "secret.jpg"
    make_image(1, 9).save(secret)
    secret.chmod(0)
    if os.geteuid() == 0:  # root reads any file: inject the EACCES the kernel would give anyone else
        real_open = Image.open

        def open_as_user(fp, *args, **kwargs):
            if Path(fp) == secret:
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", open_as_user)
    r = cli("extract", root, "-o", tmp_path / "c.h5", *BASE, "--workers", "0")
    assert "skipped train/dog/secret.jpg: permission denied" in r.stderr
    assert "extracted 4 images" in r.stdout


@pytest.mark.parametrize("case,message", [("empty_folder", "no images"), ("missing_path", "no such folder"),
                                          ("not_a_folder", "not a folder"), ("missing_csv", "no such CSV manifest")])
def test_bad_data_roots(tmp_path, cli, case, message):
    target = tmp_path / ("labels.csv" if case == "missing_csv" else "data")
    if case == "empty_folder":
        (target / "train" / "cat").mkdir(parents=True)
    elif case == "not_a_folder":
        target.write_text("x")
    r = cli("extract", target, "-o", tmp_path / "c.h5", *BASE, check=False)
    assert r.returncode == 2 and str(target) in r.stderr and message in r.stderr, r.stderr
    _no_traceback(r)


def test_val_class_missing_from_train_is_reported_by_extract(tmp_path, cli):
    root = write_folder(tmp_path / "data", {"train": 2, "val": 1})
    write_folder(root, {"val": 1}, classes=("zebra",))
    r = cli("extract", root, "-o", tmp_path / "c.h5", *BASE)
    assert "warning: val: class(es) zebra have no training images" in r.stderr


def _damaged_caches(good: Path, tmp: Path) -> dict[str, Path]:
    out = {}
    out["truncated"] = tmp / "truncated.h5"
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["not_hdf5"] = tmp / "not_hdf5.h5"
    out["not_hdf5"].write_bytes(b"PK\x03\x04 a zip file, not a cache")
    out["foreign_hdf5"] = tmp / "foreign.h5"
    with h5py.File(out["foreign_hdf5"], "w") as f:
        f["x"] = np.zeros(3)
    out["missing_dataset"] = tmp / "missing.h5"
    shutil.copy(good, out["missing_dataset"])
    with h5py.File(out["missing_dataset"], "a") as f:
        del f["train/labels"]
    out["wrong_shape"] = tmp / "wrong_shape.h5"
    shutil.copy(good, out["wrong_shape"])
    with h5py.File(out["wrong_shape"], "a") as f:
        del f["val/features"]
        f["val/features"] = np.zeros((6, 7), np.float32)
    out["future_version"] = tmp / "future.h5"
    shutil.copy(good, out["future_version"])
    with h5py.File(out["future_version"], "a") as f:
        f.attrs["format_version"] = 99
    return out


def test_damaged_caches_give_clear_errors(image_folder, tmp_path, cli):
    good = tmp_path / "good.h5"
    cli("extract", image_folder, "-o", good, *BASE)
    expected = {
        "truncated": "not a readable HDF5 file",
        "not_hdf5": "not a readable HDF5 file",
        "foreign_hdf5": "not a cnncodes cache",
        "missing_dataset": "has no 'labels' dataset",
        "wrong_shape": "val/features has shape (6, 7)",
        "future_version": "cache format version 99 is not supported",
    }
    for case, path in _damaged_caches(good, tmp_path).items():
        r = cli("info", path, check=False)
        assert r.returncode == 2 and expected[case] in r.stderr and str(path) in r.stderr, (case, r.stderr)
        _no_traceback(r)
        # extract into a damaged cache refuses (it would otherwise drop its content) and names --overwrite
        r = cli("extract", image_folder, "-o", path, *BASE, check=False)
        assert r.returncode == 2 and "--overwrite" in r.stderr, (case, r.stderr)
    with h5py.File(good, "a") as f:  # a label no class has: readable, but fit-head must not crash on it
        f["train/labels"][0] = 7
    r = cli("fit-head", good, "-o", tmp_path / "h.h5", "--C", "1", check=False)
    assert r.returncode == 2 and "train/labels holds class index 7 but the cache has 2 classes" in r.stderr, r.stderr
    _no_traceback(r)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_weights_are_refused_not_executed(image_folder, tmp_path, cli):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"conv1.weight": _Payload()}, f)
    torch_style = tmp_path / "evil_zip.pth"
    torch.save({"conv1.weight": _Payload()}, torch_style)
    for path in (evil, torch_style):
        r = cli("extract", image_folder, "-o", tmp_path / "c.h5", "--weights", path, "-q", check=False)
        assert r.returncode == 2 and "refused" in r.stderr and str(path) in r.stderr, r.stderr
        assert not marker.exists()


def test_weights_for_another_arch(image_folder, tmp_path, cli):
    import torchvision

    w = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), w)
    r = cli("extract", image_folder, "-o", tmp_path / "c.h5", "--arch", "resnet50", "--weights", w, check=False)
    assert r.returncode == 2 and "do not fit --arch resnet50" in r.stderr and "pass the --arch" in r.stderr
    _no_traceback(r)


def test_weights_files_that_are_not_state_dicts_are_one_line_errors(image_folder, tmp_path, cli):
    cases = {"empty.pth": b"", "text.pth": b"hi", "nontensor.pth": None, "folder.pth": "dir"}
    for name, content in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is None:
            torch.save({"epoch": 3, "note": "no tensors"}, path)
        else:
            path.write_bytes(content)
    expected = {"empty.pth": "not a readable PyTorch weights file", "text.pth": "not a readable PyTorch weights file",
                "nontensor.pth": "a dict without tensors, not a state_dict", "folder.pth": "a folder, not a weights file"}
    for name, message in expected.items():
        r = cli("extract", image_folder, "-o", tmp_path / "c.h5", "--weights", tmp_path / name, "-q", check=False)
        assert r.returncode == 2 and message in r.stderr and name in r.stderr, (name, r.stderr)
        _no_traceback(r)


def test_outputs_never_replace_finished_work_of_another_kind(image_folder, tmp_path, cli):
    """fit-head -o onto the cache, predict -o onto the head or the manifest: refused before any work,
    the file intact; a rerun still replaces its own earlier output."""
    cache, head = tmp_path / "c.h5", tmp_path / "h.h5"
    cli("extract", image_folder, "-o", cache, *BASE)
    before = hashlib.sha256(cache.read_bytes()).hexdigest()
    for out in (cache, tmp_path / "other-cache.h5"):
        if out != cache:
            shutil.copy(cache, out)
        r = cli("fit-head", cache, "-o", out, "--C", "1", check=False)
        assert r.returncode == 2 and str(out) in r.stderr and ("an input" in r.stderr or "is not a head" in r.stderr)
        _no_traceback(r)
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == before
    cli("fit-head", cache, "-o", head, "--C", "1")
    cli("fit-head", cache, "-o", head, "--C", "2")  # a head replaces a head
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in sorted(str(q) for q in image_folder.rglob("*.jpg"))))
    kept = manifest.read_text()
    for out, message in [(head, "written as .csv or .json"), (tmp_path / "p.txt", "written as .csv or .json"),
                         (manifest, "an input of the command")]:
        r = cli("predict", head, manifest, "-o", out, "--workers", "0", check=False)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        _no_traceback(r)
    assert manifest.read_text() == kept and hashlib.sha256(cache.read_bytes()).hexdigest() == before
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    r = cli("predict", head, manifest, "-o", tmp_path / "notes.json", "--workers", "0", check=False)
    assert r.returncode == 2 and "exists and is not a predictions file" in r.stderr
    cli("predict", head, manifest, "-o", tmp_path / "p.csv", "--workers", "0")
    cli("predict", head, manifest, "-o", tmp_path / "p.csv", "--workers", "0")  # predictions replace predictions


def test_bad_numbers_unreadable_inputs_and_unwritable_paths_are_one_line_errors(image_folder, tmp_path, cli):
    cache, head = tmp_path / "c.h5", tmp_path / "h.h5"
    cli("extract", image_folder, "-o", cache, *BASE)
    cli("fit-head", cache, "-o", head, "--C", "1")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "a-file").write_text("x")
    cases = [
        (("extract", image_folder, "-o", tmp_path / "x.h5", "--weights", "none", "--image-size", "8"),
         "--image-size must be >= 32"),
        (("predict", head, image_folder, "--batch-size", "0"), "--batch-size must be >= 1"),
        (("predict", head, image_folder, "--workers", "-1"), "--workers >= 0"),
        (("fit-head", cache, "-o", tmp_path / "h2.h5", "--clf", "linear", "--C", "1", "--epochs", "-2"),
         "--epochs must be >= 1"),
        (("predict", head, tmp_path / "zero.jpg", tmp_path / "text.png", "--workers", "0"),
         "no readable images among the 2 given"),
        (("fit-head", cache, "-o", tmp_path / "a-file" / "h.h5", "--C", "1"), "a-file"),
    ]
    for args, message in cases:
        r = cli(*args, check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        _no_traceback(r)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "h2.h5").exists()


def test_a_damaged_classifier_description_is_one_line(image_folder, tmp_path, cli):
    cli("extract", image_folder, "-o", tmp_path / "c.h5", *BASE)
    cli("fit-head", tmp_path / "c.h5", "-o", tmp_path / "h.h5", "--C", "1")
    cli("export", tmp_path / "h.h5", "-o", tmp_path / "m.pt")
    side = tmp_path / "m.json"
    meta = json.loads(side.read_text())
    for damaged in ({k: v for k, v in meta.items() if k != "classes"}, {**meta, "classes": ["a", "b", "c"]}):
        side.write_text(json.dumps(damaged))
        r = cli("predict", tmp_path / "m.pt", image_folder / "val", "--workers", "0", check=False)
        assert r.returncode == 2 and "m.json: damaged classifier description" in r.stderr, r.stderr
        _no_traceback(r)


# --------------------------------------------------------------------------- crashes


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = write_folder(root / "data", {"train": 8, "val": 3})
    reference = root / "reference.h5"
    start = time.perf_counter()
    subprocess.run(_extract_argv(data, reference), check=True, capture_output=True, timeout=300)
    return data, reference, time.perf_counter() - start


@pytest.mark.parametrize("seed", range(5))
def test_kill_9_at_random_points_then_rerun_equals_uninterrupted(crash_data, tmp_path, seed):
    data, reference, seconds = crash_data
    out = tmp_path / "c.h5"
    delay = random.Random(seed).uniform(0.3, seconds)  # anywhere: start-up, shards, the final write
    proc = subprocess.Popen(_extract_argv(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # never half-written: either absent or a complete, valid cache
        Cache(out).close()
    rerun = subprocess.run(_extract_argv(data, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    _same(out, reference)


def test_second_extract_on_same_output_is_refused(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 20})
    out = tmp_path / "c.h5"
    first = subprocess.Popen(_extract_argv(data, out, "--batch-size", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = tmp_path / "c.shards"
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("*/*.h5")):
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # freeze it mid-run, lock held, so the overlap is certain
    try:
        second = subprocess.run(_extract_argv(data, out), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "in use by another cnncodes process" in second.stderr
    _no_traceback(second)
    assert first.wait(timeout=300) == 0
    with Cache(out) as c:
        assert len(c.paths("train")) == 40


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG like a full disk, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_keeps_the_previous_cache_intact(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 3})
    out = tmp_path / "c.h5"
    subprocess.run(_extract_argv(data, out), check=True, capture_output=True, timeout=300)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    reference = _codes(out)
    write_folder(data, {"train": 12}, classes=("cow", "eel"))  # more classes: every shard is relabelled
    limit = max(p.stat().st_size for p in (tmp_path / "c.shards").glob("*/*.h5")) * 2  # < a 12-image shard
    proc = subprocess.run(_extract_argv(data, out, "--workers", "0", "--shard-size", "1000"), capture_output=True, text=True,
                          timeout=300, preexec_fn=_file_size_limit(limit))
    assert proc.returncode == 2 and "write failed: no space left" in proc.stderr, proc.stderr
    _no_traceback(proc)
    # the index is untouched and every shard it names is still the one it indexed: readable as it was
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert _codes(out).keys() == reference.keys()
    for split, (feats, paths, labels, views) in _codes(out).items():
        assert np.array_equal(feats, reference[split][0]) and paths == reference[split][1]


def test_disk_full_is_refused_before_a_shard_is_written(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 20})
    proc = subprocess.run(_extract_argv(data, tmp_path / "c.h5", "--workers", "0", "--shard-size", "1000"),
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(30_000))
    assert proc.returncode == 2 and "write failed: no space left: needs about" in proc.stderr, proc.stderr
    _no_traceback(proc)
    assert not (tmp_path / "c.h5").exists()


def test_disk_full_mid_write_is_one_clear_line(tmp_path):
    """The space check cannot see everything coming (another process fills the disk): a shard that
    overflows midway is still one line, exit 2 (the check is switched off here to get there)."""
    data = write_folder(tmp_path / "data", {"train": 20})
    argv = _extract_argv(data, tmp_path / "c.h5", "--workers", "0", "--shard-size", "1000")
    run = ("import sys, cnncodes.store.sharded as s; s.check_space = lambda *a, **k: None; "
           "from cnncodes.cli import main; sys.argv = ['cnncodes', *sys.argv[1:]]; main()")
    proc = subprocess.run([sys.executable, "-c", run, *argv[3:]], capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(30_000))
    assert proc.returncode == 2 and "write failed: no space left (or file size limit)" in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr
    _no_traceback(proc)
    assert not (tmp_path / "c.h5").exists()


def test_ctrl_c_stops_cleanly_with_resume_hint(tmp_path):
    # Enough batches of one image that the run outlasts the signal on any device (a GPU
    # finished 40 before it arrived); small crops and batch 16 keep the CPU rerun cheap.
    per_class, small = 100, ("--image-size", "32")
    data = write_folder(tmp_path / "data", {"train": per_class}, size=32)
    out = tmp_path / "c.h5"
    proc = subprocess.Popen(_extract_argv(data, out, *small, "--batch-size", "1", "--workers", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = tmp_path / "c.shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*/*.h5"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "rerun the same command to continue" in err and "Traceback" not in err
    saved = len(list(shards.glob("*/*.h5")))
    assert saved >= 2
    rerun = subprocess.run(_extract_argv(data, out, *small, "--batch-size", "16"), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and f"{saved} shards skipped as done" in rerun.stdout, rerun.stdout
    assert _extracted(rerun.stdout) > 0  # the first run was really cut short


def test_malicious_pickle_heads_and_models_are_refused_not_executed(image_folder, tmp_path, cli):
    import json

    marker = tmp_path / "pwned"
    _Payload.marker = marker
    evil_model = tmp_path / "model.pt"
    torch.save({"fc.weight": _Payload()}, evil_model)
    meta = {"format": "cnncodes-classifier", "version": 1, "arch": "resnet18", "num_classes": 2,
            "classes": ["cat", "dog"], "preprocessing": {"resize": 73, "crop": 64}, "source": {}}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    evil_head = tmp_path / "head.h5"
    with open(evil_head, "wb") as f:
        pickle.dump({"W": _Payload()}, f)
    for model, needle in ((evil_model, "refused"), (evil_head, "not a readable HDF5 head file")):
        r = cli("predict", model, image_folder / "val", check=False)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        _no_traceback(r)
        assert not marker.exists()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "cnncodes-finetune-checkpoint", "model": _Payload()}, run / "checkpoint.pt")
    r = cli("finetune", image_folder, "-o", run, "--weights", "none", "--image-size", "32", "--resume", check=False)
    assert r.returncode == 2 and "refused: the checkpoint holds pickled Python objects" in r.stderr, r.stderr
    assert "weights_only=False" not in r.stderr and "weights_only` set to `False" not in r.stderr  # never that advice
    _no_traceback(r)
    assert not marker.exists()


# --------------------------------------------------------------------------- the cache / run-folder lock

_HOLD_LOCK = """
import os, sys, time
from cnncodes.runtime import FileLock
lock = FileLock(sys.argv[1], "cache x").__enter__()
child = os.fork()  # like a DataLoader worker forked after the lock was taken
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_lock_dies_with_its_process_not_with_forked_children(tmp_path):
    from cnncodes.errors import CnnCodesError
    from cnncodes.runtime import FileLock

    target = tmp_path / "c.h5"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(CnnCodesError, match=f"in use by another cnncodes process \\(pid {holder.pid}\\)"):
            FileLock(target, "cache x").__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child still lives ...
        with FileLock(target, "cache x"):  # ... and does not hold the lock
            assert (tmp_path / "c.h5.lock").read_text() == str(os.getpid())
    finally:
        os.kill(child, signal.SIGKILL)


def test_lock_refusal_never_names_a_dead_pid(tmp_path):
    from cnncodes.errors import CnnCodesError
    from cnncodes.runtime import FileLock

    target = tmp_path / "c.h5"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child = int(holder.stdout.readline())
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        # a holder that has not yet written its pid leaves the previous (dead) owner's in the file
        (tmp_path / "c.h5.lock").write_text(str(dead.pid))
        with pytest.raises(CnnCodesError) as e:
            FileLock(target, "cache x").__enter__()
        assert "in use by another cnncodes process;" in str(e.value) and str(dead.pid) not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
        os.kill(child, signal.SIGKILL)


# --------------------------------------------------------------------------- resource errors never destroy shards


def _open_files_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def _extracted(stdout: str) -> int:
    return int(stdout.split("extracted ")[1].split()[0])


def test_resume_under_a_small_open_files_limit_keeps_every_shard(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 60, "val": 6}, size=32)
    argv = lambda out, *extra: _extract_argv(data, out, "--batch-size", "1", "--image-size", "32",  # noqa: E731
                                             "--shard-size", "1", *extra)
    reference = tmp_path / "reference.h5"
    subprocess.run(argv(reference), check=True, capture_output=True, timeout=600)
    out = tmp_path / "c.h5"
    folder = tmp_path / "c.shards"
    proc = subprocess.Popen(argv(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(folder.glob("*/*.h5"))) < 50 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(folder.glob("*/*.h5"))
    assert len(shards) >= 50 and not out.exists(), "the run finished before 50 shards: make it longer"
    info = run_cli_subprocess("info", out)
    assert info.returncode == 2 and f"{len(shards)} output shards of an interrupted extract wait" in info.stderr

    limited = subprocess.run(argv(out), capture_output=True, text=True, timeout=600, preexec_fn=_open_files_limit(40))
    _no_traceback(limited)
    if limited.returncode == 0:  # indexed: the finished shards kept, none redone
        assert f"{len(shards)} shards skipped as done" in limited.stdout, limited.stdout
    else:  # stopped: one clear line, every shard still there
        assert limited.returncode == 2 and "every shard is kept" in limited.stderr, limited.stderr
        assert all(s.exists() for s in shards)
        rerun = subprocess.run(argv(out), capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0 and f"{len(shards)} shards skipped as done" in rerun.stdout, rerun.stderr
    _same(out, reference)


SHARDED = {"weights": "none", "image_size": 32, "batch_size": 2, "shard_size": 1, "progress": False}


def _shards_left_by_an_interrupted_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path, list[Path]]:
    """6 images extracted into 6 output shards, then Ctrl-C before the index: (data, index, shards)."""
    from cnncodes.extract import extract

    data, out = write_folder(tmp_path / "data", {"train": 3}), tmp_path / "c.h5"
    with monkeypatch.context() as m:
        m.setattr("cnncodes.extract.sharded.write_index", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            extract(data, out, **SHARDED)
    assert not out.exists()  # the index was never written
    shards = sorted((tmp_path / "c.shards").glob("*/*.h5"))
    assert len(shards) == 6
    return data, out, shards


def test_unreadable_shard_stops_the_run_and_keeps_every_shard(tmp_path, monkeypatch):
    """EACCES on one shard (injected: root reads any file) is no proof of a torn shard."""
    import errno

    from cnncodes.errors import CnnCodesError
    from cnncodes.extract import extract

    data, out, shards = _shards_left_by_an_interrupted_run(tmp_path, monkeypatch)
    real_open = open

    def refuse(path, *args, **kwargs):
        if Path(path) == shards[1]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(CnnCodesError, match=f"{shards[1]}: cannot read .*Permission denied.*every shard is kept: make the file readable"):
        extract(data, out, **SHARDED)
    assert sorted((tmp_path / "c.shards").glob("*/*.h5")) == shards


def test_a_torn_shard_is_redone_and_said(tmp_path, monkeypatch):
    from cnncodes.extract import extract

    data, out, shards = _shards_left_by_an_interrupted_run(tmp_path, monkeypatch)
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # damaged after it was written
    r = extract(data, out, **SHARDED)
    assert r.extracted == 1 and r.shards["redone"] == {"torn": 1} and r.shards["done"] == 5  # that shard alone
    extract(data, tmp_path / "fresh.h5", **SHARDED)
    _same(out, tmp_path / "fresh.h5")


def test_interrupted_overwrite_resumes_when_rerun(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 20})
    out = tmp_path / "c.h5"
    subprocess.run(_extract_argv(data, out), check=True, capture_output=True, timeout=300)
    new = ("--image-size", "32", "--overwrite", "--batch-size", "1")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c.shards").glob("*/*.h5")}
    proc = subprocess.Popen(_extract_argv(data, out, *new), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    rewritten = lambda: [p for p in (tmp_path / "c.shards").glob("*/*.h5") if before.get(p) != p.stat().st_mtime_ns]  # noqa: E731
    while time.time() < deadline and len(rewritten()) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(rewritten())
    assert saved >= 3
    rerun = subprocess.run(_extract_argv(data, out, *new), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"{saved} shards skipped as done" in rerun.stdout, rerun.stdout + rerun.stderr
    reference = tmp_path / "reference.h5"
    subprocess.run(_extract_argv(data, reference, "--image-size", "32", "--batch-size", "1"), check=True, capture_output=True, timeout=300)
    _same(out, reference)


def run_cli_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "cnncodes", *map(str, args)], capture_output=True, text=True, timeout=300)
