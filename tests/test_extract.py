"""`extract`: HDF5 content, bad files, resume after kill -9, incremental runs, config refusal, views."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_image, write_folder

from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.store import Cache

FAST = dict(arch="resnet18", weights="none", image_size=64, progress=False, log=lambda m: None)


def _arrays(path: Path) -> dict:
    with Cache(path) as c:
        return {s: (c.features(s)[()], c.labels(s), list(c.paths(s)), c.views(s)) for s in c.splits}


def _assert_same_cache(a: Path, b: Path, exact: bool = True) -> None:
    ca, cb = _arrays(a), _arrays(b)
    assert ca.keys() == cb.keys()
    for s in ca:
        fa, la, pa, va = ca[s]
        fb, lb, pb, vb = cb[s]
        assert pa == pb and np.array_equal(la, lb) and np.array_equal(va, vb)
        if exact:
            assert np.array_equal(fa, fb)
        else:
            np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)


def test_cache_layout_and_attributes(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    r = extract(image_folder, out, **FAST)
    assert r.extracted == 18 and r.split_counts == {"train": 12, "val": 6}
    with h5py.File(out, "r") as f:  # plain HDF5, no cnncodes needed to read it
        assert f.attrs["format"] == "cnncodes-cache" and f.attrs["arch"] == "resnet18"
        assert f.attrs["weights"] == "none:seed0"
        assert json.loads(f.attrs["classes"]) == ["cat", "dog"]
        pre = json.loads(f.attrs["preprocessing"])
        assert pre["crop"] == 64 and pre["resize"] == 73 and pre["mean"] == [0.485, 0.456, 0.406]
        assert {"cnncodes_version", "torch_version", "torchvision_version"} <= set(f.attrs)
        feats = f["train/features"]  # virtual: rows of the output shards, one per class folder here
        assert feats.shape == (12, 512) and feats.dtype == np.float32 and feats.is_virtual
        assert list(f["train/labels"][()]) == [0] * 6 + [1] * 6
        assert f["train/paths"].asstr()[0] == "train/cat/000.jpg"
        assert list(f["val/views"][()]) == [0] * 6
        assert np.isfinite(feats[()]).all() and np.abs(feats[()]).sum() > 0
    stats = {str(q.relative_to(image_folder)): q.stat() for q in sorted((image_folder / "val").rglob("*.jpg"))}
    recorded = {}
    for shard in sorted((tmp_path / "c.shards" / "val").glob("*.h5")):  # each output shard lists its files, signed
        with h5py.File(shard, "r") as f:
            assert f.attrs["source_digest"] and f.attrs["split"] == "val"
            recorded.update({p: (s, m) for p, s, m in zip(f["files/paths"].asstr()[()], f["files/size"][()].tolist(),
                                                           f["files/mtime_ns"][()].tolist())})
    assert recorded == {k: (st.st_size, st.st_mtime_ns) for k, st in stats.items()}


def test_bad_files_are_skipped_recorded_and_counted(image_folder, tmp_path):
    cat = image_folder / "train" / "cat"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "noise.jpg").write_bytes(os.urandom(3000))
    (cat / "readme.txt").write_text("not an image")
    full = (cat / "000.jpg").read_bytes()
    (cat / "half.jpg").write_bytes(full[: len(full) // 2])
    out = tmp_path / "c.h5"
    r = extract(image_folder, out, **FAST)
    reasons = dict(r.skipped)
    assert set(reasons) == {"train/cat/zero.jpg", "train/cat/noise.jpg", "train/cat/readme.txt", "train/cat/half.jpg"}
    assert "empty file" in reasons["train/cat/zero.jpg"]
    assert "truncated" in reasons["train/cat/half.jpg"]
    assert "unsupported extension" in reasons["train/cat/readme.txt"]
    with Cache(out) as c:
        assert dict(c.skipped("train")) == reasons
        assert len(c.paths("train")) == 12  # the good ones are all there
    with pytest.raises(CnnCodesError, match="--strict"):
        extract(image_folder, tmp_path / "strict.h5", strict=True, **FAST)


def test_every_image_mode_is_extracted(tmp_path):
    root = tmp_path / "modes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    base = make_image(0, 0, 64)
    base.convert("L").save(root / "a" / "gray.png")
    base.convert("P").save(root / "a" / "pal.gif")
    base.convert("RGBA").save(root / "a" / "rgba.png")
    base.convert("CMYK").save(root / "b" / "cmyk.jpg")
    base.save(root / "b" / "x.webp")
    base.save(root / "b" / "x.tif")
    base.save(root / "b" / "x.bmp")
    r = extract(root, tmp_path / "m.h5", **FAST)
    assert r.skipped == [] and r.split_counts == {"train": 7}


def test_batch_size_does_not_change_features(image_folder, tmp_path):
    extract(image_folder, tmp_path / "b1.h5", batch_size=1, workers=0, **FAST)
    extract(image_folder, tmp_path / "b7.h5", batch_size=7, workers=1, **FAST)
    _assert_same_cache(tmp_path / "b1.h5", tmp_path / "b7.h5", exact=False)


def test_views_are_tagged_and_reproducible(image_folder, tmp_path):
    extract(image_folder, tmp_path / "v1.h5", views=2, **FAST)
    extract(image_folder, tmp_path / "v2.h5", views=2, batch_size=5, **FAST)
    extract(image_folder, tmp_path / "v3.h5", views=2, seed=1, **FAST)
    extract(image_folder, tmp_path / "plain.h5", **FAST)
    _assert_same_cache(tmp_path / "v1.h5", tmp_path / "v2.h5", exact=False)
    a, seeded, plain = _arrays(tmp_path / "v1.h5"), _arrays(tmp_path / "v3.h5"), _arrays(tmp_path / "plain.h5")
    feats, labels, paths, views = a["train"]
    assert len(feats) == 36 and list(views[:3]) == [0, 1, 2] and paths[0] == paths[1] == paths[2]
    assert not np.allclose(feats[1], feats[2])  # different views differ
    np.testing.assert_allclose(feats[views == 0], plain["train"][0], rtol=1e-4, atol=1e-5)  # view 0 = plain
    assert not np.allclose(feats[views == 1], seeded["train"][0][views == 1])  # the seed matters
    assert len(a["val"][0]) == 6  # --views is for training images only
    with Cache(tmp_path / "v1.h5") as c:
        groups = c.groups("train")
        assert (groups[0::3] == groups[1::3]).all() and len(np.unique(groups)) == 12


def test_rerun_unchanged_does_no_work(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract(image_folder, out, **FAST)
    before = out.stat().st_mtime_ns
    r = extract(image_folder, out, **FAST)
    assert r.up_to_date and r.extracted == 0 and out.stat().st_mtime_ns == before


def test_incremental_add_change_and_delete_matches_fresh_run(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract(image_folder, out, **FAST)
    make_image(1, 50).save(image_folder / "train" / "cat" / "new.jpg")
    make_image(0, 51).save(image_folder / "val" / "dog" / "000.jpg")  # changed content
    os.utime(image_folder / "val" / "dog" / "000.jpg", ns=(1, 1))
    (image_folder / "train" / "dog" / "001.jpg").unlink()
    (image_folder / "train" / "cat" / "002.jpg").write_bytes(b"junk")  # a cached image replaced by a bad file
    r = extract(image_folder, out, **FAST)
    # one shard per class folder here: the three touched ones are redone whole, val/cat is kept
    assert r.shards["redone"] == {"changed": 3} and r.shards["done"] == 1 and r.extracted == 6 + 5 + 3
    assert [p for p, _ in r.skipped] == ["train/cat/002.jpg"]
    fresh = extract(image_folder, tmp_path / "fresh.h5", **FAST)
    _assert_same_cache(out, tmp_path / "fresh.h5", exact=True)  # each shard batched from its start
    with Cache(out) as a, Cache(tmp_path / "fresh.h5") as b:
        assert a.skipped("train") == b.skipped("train") == fresh.skipped  # its old code is gone, not kept
    assert extract(image_folder, out, **FAST).up_to_date


def test_mismatched_config_is_refused_unless_overwrite(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract(image_folder, out, **FAST)
    with pytest.raises(CnnCodesError, match="another configuration.*--overwrite"):
        extract(image_folder, out, **{**FAST, "image_size": 32})
    with pytest.raises(CnnCodesError, match="arch"):
        extract(image_folder, out, **{**FAST, "arch": "resnet34"})
    r = extract(image_folder, out, overwrite=True, **{**FAST, "image_size": 32})
    assert r.extracted == 18
    with Cache(out) as c:
        assert c.config.preprocessing["crop"] == 32


def _extract_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cnncodes", "extract", str(data), "-o", str(out), "--weights", "none",
            "--image-size", "64", "--batch-size", "2", "--workers", "0", "--shard-size", "2", "-q", *extra]


def test_resume_after_kill_9_gives_identical_cache(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 16, "val": 4})
    out = tmp_path / "c.h5"
    shards = tmp_path / "c.shards"
    proc = subprocess.Popen(_extract_cmd(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*/*.h5"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in shards.glob("*/*.h5")}
    assert len(finished) >= 3 and not out.exists()  # killed mid-run, no index yet
    rerun = subprocess.run(_extract_cmd(data, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} shards skipped as done" in rerun.stdout  # finished work was not redone...
    assert all(p.stat().st_mtime_ns == m for p, m in finished.items())  # ...nor rewritten
    uninterrupted = tmp_path / "u.h5"
    subprocess.run(_extract_cmd(data, uninterrupted), check=True, capture_output=True, timeout=300)
    _assert_same_cache(out, uninterrupted, exact=True)


def test_cli_extract_and_info(image_folder, tmp_path, cli):
    (image_folder / "train" / "cat" / "zero.jpg").write_bytes(b"")
    out = tmp_path / "c.h5"
    r = cli("extract", image_folder, "-o", out, "--weights", "none", "--image-size", "64", "--views", "1")
    assert "extracted 18 images (30 codes)" in r.stdout and "skipped 1 samples" in r.stdout
    assert "skipped train/cat/zero.jpg: empty file" in r.stderr
    info = cli("info", out).stdout
    assert "train: 12 images, 24 codes (1 extra views each), 1 skipped" in info and "512-d" in info
    j = json.loads(cli("info", out, "--json").stdout)
    assert j["splits"]["val"]["images"] == 6 and j["feature_dim"] == 512
    again = cli("extract", image_folder, "-o", out, "--weights", "none", "--image-size", "64", "--views", "1")
    assert "up to date" in again.stdout


def test_cli_errors_are_one_line(tmp_path, cli):
    for args, needle in [
        (("extract", tmp_path / "nope", "-o", tmp_path / "c.h5", "--weights", "none"), "no such folder"),
        (("info", tmp_path / "nope.h5"), "no such cache file"),
        (("extract", tmp_path, "-o", tmp_path / "c.h5", "--weights", "none"), "no images found"),
    ]:
        r = cli(*args, check=False)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    r = cli("info", tmp_path / "junk.h5", check=False)
    assert r.returncode == 2 and "not a readable HDF5 file" in r.stderr


def test_cli_options_and_defaults_are_the_config_fields():
    """Every ExtractConfig field is a flag of `cnncodes extract`, with the config's default; the flags
    parse into the config the command passes whole."""
    import dataclasses

    from cnncodes.cli.extract_cmd import extract_command
    from cnncodes.extract import ExtractConfig

    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    defaults = {p.name: p.default for p in extract_command.params if p.name in names}
    assert set(defaults) == names and ExtractConfig(**defaults) == ExtractConfig()
    args = ["data", "-o", "c.h5", "--arch", "densenet121", "--layer", "features.denseblock2", "--views", "2",
            "--decode", "cpu", "--strict", "--no-channels-last", "--shard-size", "5"]
    params = extract_command.make_context("extract", args).params
    steering = ("data", "out", "overwrite", "quiet", "path_col", "label_col", "val_fraction",
                "val_shards", "test_shards", "label_key", "classes_file", "image_col")  # the input's options
    assert ExtractConfig(**{k: v for k, v in params.items() if k not in steering}) == ExtractConfig(
        arch="densenet121", layers="features.denseblock2", views=2, decode="cpu", strict=True, channels_last=False,
        shard_size=5)


def test_a_config_passed_whole_equals_its_keywords_and_bad_options_are_refused(image_folder, tmp_path):
    from cnncodes.extract import ExtractConfig

    config = ExtractConfig(arch="resnet18", weights="none", image_size=64, views=1)
    extract(image_folder, tmp_path / "whole.h5", config, progress=False, log=lambda m: None)
    extract(image_folder, tmp_path / "keywords.h5", views=1, **FAST)
    _assert_same_cache(tmp_path / "whole.h5", tmp_path / "keywords.h5")
    with pytest.raises(TypeError, match="unexpected keyword argument.*image_szie.*fields of ExtractConfig"):
        extract(image_folder, tmp_path / "x.h5", image_szie=64, **FAST)
    for bad, message in [({"views": -1}, "--views and --eval-views must be >= 0"),
                         ({"batch_size": 0}, "--batch-size must be >= 1"),
                         ({"decode": "nvjpeg"}, "unknown --decode 'nvjpeg'"),
                         ({"precision": "fp8"}, "unknown --precision 'fp8'")]:
        with pytest.raises(CnnCodesError, match=message):
            extract(image_folder, tmp_path / "x.h5", **bad, **FAST)
    assert not (tmp_path / "x.h5").exists()


def test_torchrun_two_processes_give_the_single_process_cache(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 9, "val": 4})
    args = ["extract", str(data), "--weights", "none", "--image-size", "64", "--batch-size", "4", "--views", "1", "-q"]
    single, multi = tmp_path / "one.h5", tmp_path / "two.h5"
    subprocess.run([sys.executable, "-m", "cnncodes", *args, "-o", str(single)], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cnncodes", *args, "-o", str(multi)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("extracted 26 images (44 codes)") == 1  # rank 0 reports, once, for both
    _assert_same_cache(single, multi, exact=True)


# --------------------------------------------------------------------------- fast paths against the plain path


def _extract_codes(data: Path, out: Path, monkeypatch, precision: str, draft: bool, **kw) -> tuple[dict, list[str]]:
    """Codes by path (eval view) of an extract; draft=False decodes every JPEG at full size (the plain path)."""
    from cnncodes.data import Preprocessing

    logs: list[str] = []
    with monkeypatch.context() as m:
        if not draft:
            m.setattr(Preprocessing, "draft_size", property(lambda self: 0))
        extract(data, out, precision=precision, workers=0, progress=False, log=logs.append, **kw)
    with Cache(out) as c:
        codes = {(s, p): x for s in c.splits for p, x in zip(c.paths(s), c.features(s)[()])}
    return codes, logs


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in a)


def test_bf16_and_jpeg_draft_codes_are_close_to_the_plain_path(tmp_path, monkeypatch):
    """Measured on these images (resnet18, random weights, 32 px crops of 160 px JPEGs), max over
    images of |fast - plain| / |plain|: draft decode 1.8e-2, bf16 8.6e-3. Bounds: 2x measured.
    Both are > 0: each fast path really ran. A PNG gets no draft (and a note saying so)."""
    data = write_folder(tmp_path / "data", {"train": 4, "val": 2}, size=160)
    make_image(1, 77, 160).save(data / "train" / "dog" / "x.png")
    kw = dict(arch="resnet18", weights="none", image_size=32)
    plain, _ = _extract_codes(data, tmp_path / "plain.h5", monkeypatch, "fp32", False, **kw)
    draft, logs = _extract_codes(data, tmp_path / "draft.h5", monkeypatch, "fp32", True, **kw)
    bf16, _ = _extract_codes(data, tmp_path / "bf16.h5", monkeypatch, "bf16", False, **kw)
    assert 0 < _max_rel_diff(draft, plain) < 3.6e-2
    assert 0 < _max_rel_diff(bf16, plain) < 1.7e-2
    assert np.array_equal(draft[("train", "train/dog/x.png")], plain[("train", "train/dog/x.png")])
    assert any("JPEG draft decode (reduced DCT scale) does not apply to 1 non-JPEG file(s) (by extension, e.g. " in m
               and "train/dog/x.png" in m for m in logs), logs


@pytest.mark.slow
def test_fast_paths_keep_ants_bees_accuracy_with_real_resnet50(tmp_path, monkeypatch):
    """bf16 and the JPEG draft decode, each against fp32 + full decode: logreg val accuracy within 0.5 pt."""
    from conftest import HYMENOPTERA, RESNET50_KERAS

    from cnncodes.heads import fit_head

    if not (HYMENOPTERA.is_dir() and RESNET50_KERAS.is_file()):
        pytest.skip(f"needs {HYMENOPTERA} and {RESNET50_KERAS} (../shared)")
    kw = dict(arch="resnet50", weights=str(RESNET50_KERAS))
    acc, codes = {}, {}
    for name, precision, draft in (("plain fp32 full decode", "fp32", False), ("bf16", "bf16", False),
                                   ("jpeg draft", "fp32", True)):
        out = tmp_path / f"{precision}-{draft}.h5"
        codes[name], _ = _extract_codes(HYMENOPTERA, out, monkeypatch, precision, draft, **kw)
        _, report = fit_head(out, "logreg", "auto")
        acc[name] = report["splits"]["val"]["accuracy"]
    for name in acc:
        diff = _max_rel_diff(codes[name], codes["plain fp32 full decode"])
        print(f"{name}: val accuracy {100 * acc[name]:.2f}%, codes max relative difference {diff:.2e}")
    for name in ("bf16", "jpeg draft"):
        assert abs(acc[name] - acc["plain fp32 full decode"]) <= 0.005 + 1e-9, acc


def test_a_one_file_cache_reads_and_extracting_into_it_says_how_to_convert(image_folder, tmp_path, cli):
    """A one-file cache (what `cnncodes pack` writes, and what cnncodes wrote before every input was
    sharded) reads like a store; extending it in place is refused with the way out."""
    extract(image_folder, tmp_path / "store.h5", **FAST)
    cli("pack", tmp_path / "store.h5", "-o", tmp_path / "one.h5")
    _assert_same_cache(tmp_path / "store.h5", tmp_path / "one.h5")
    cli("fit-head", tmp_path / "one.h5", "-o", tmp_path / "h.h5", "--C", "1")
    r = cli("extract", image_folder, "-o", tmp_path / "one.h5", "--weights", "none", "--image-size", "64", check=False)
    assert r.returncode == 2 and "is a one-file cache (packed, or from an earlier cnncodes)" in r.stderr
    assert "pass --overwrite to extract it again as a sharded store" in r.stderr and "Traceback" not in r.stderr
    r = extract(image_folder, tmp_path / "one.h5", overwrite=True, **FAST)
    assert r.extracted == 18
    _assert_same_cache(tmp_path / "store.h5", tmp_path / "one.h5")
