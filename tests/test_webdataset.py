"""WebDataset shards in, one output shard per input shard, an index (`codes.h5`) presenting them as one cache.

Small generated shards (64 px JPEGs) and resnet18 with random weights at 64 px. Each test asserts the
codes, the files kept or the message, not merely that nothing crashed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_folder

from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.store import Cache
from cnncodes.sources.webdataset import WebDatasetSource as ShardSource, read_samples

FAST = dict(arch="resnet18", weights="none", image_size=64, batch_size=3, progress=False, log=lambda m: None)
ARGS = ["--weights", "none", "--image-size", "64", "--batch-size", "3", "-q"]


def write_shards(root: Path, split: str, dest: Path, per_shard: int, name: str | None = None) -> list[Path]:
    """The images of root/<split>/<class>/ in the folder's order, `per_shard` samples per tar
    (key = the image's path without extension, label in .cls)."""
    files = sorted((root / split).rglob("*.jpg"))
    classes = sorted(p.name for p in (root / split).iterdir())
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(0, len(files), per_shard):
        path = dest / f"{name or split}-{i // per_shard:06d}.tar"
        members = []
        for f in files[i:i + per_shard]:
            key = f.relative_to(root).with_suffix("").as_posix()
            members += [(f"{key}.jpg", f.read_bytes()), (f"{key}.cls", str(classes.index(f.parent.name)).encode())]
        write_tar(path, members)
        out.append(path)
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """A folder (train 5 + val 2 per class) and the same images as shards: 4 train tars, 1 val tar."""
    data = write_folder(tmp_path / "data", {"train": 5, "val": 2})
    write_shards(data, "train", tmp_path / "wds", 3)
    write_shards(data, "val", tmp_path / "wds", 4)
    source = ShardSource({"train": (str(tmp_path / "wds" / "train-{000000..000003}.tar"),),
                          "val": (str(tmp_path / "wds" / "val-*.tar"),)})
    return data, source


def _rows(path: Path) -> dict:
    with Cache(path) as c:
        return {s: (c.features(s)[()], c.labels(s), c.views(s)) for s in c.splits}


def _same_rows(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for s in ra:
        for x, y in zip(ra[s], rb[s]):
            assert np.array_equal(x, y), s


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*.h5")}


# --------------------------------------------------------------------------- the store


def test_shards_give_the_folder_codes_bitwise_and_an_index_any_h5py_user_reads(shards, tmp_path):
    data, source = shards
    extract(data, tmp_path / "folder.h5", **FAST)
    # a folder's shards are its class folders here: tars of one class each batch the same images alike
    write_shards(data, "train", tmp_path / "aligned", 5)
    write_shards(data, "val", tmp_path / "aligned", 2)
    aligned = ShardSource({"train": (str(tmp_path / "aligned" / "train-*.tar"),),
                           "val": (str(tmp_path / "aligned" / "val-*.tar"),)})
    extract(aligned, tmp_path / "aligned" / "codes.h5", **FAST)
    _same_rows(tmp_path / "folder.h5", tmp_path / "aligned" / "codes.h5")
    r = extract(source, tmp_path / "out" / "codes.h5", **FAST)
    assert (r.extracted, r.shards["extracted"], r.split_counts) == (14, 5, {"train": 10, "val": 4})
    with Cache(tmp_path / "out" / "codes.h5") as c:
        assert c.classes == ["0", "1"] and c.info()["store"] == "sharded"
        assert c.paths("train")[0] == "train-000000.tar/train/cat/000"
    with h5py.File(tmp_path / "out" / "codes.h5") as f:  # plain h5py: virtual datasets over the shards
        assert f["train/features"].is_virtual and f["train/features"].shape == (10, 512)
        assert len(f["train/files/paths"]) == 4
    names = sorted(p.name for p in (tmp_path / "out" / "codes.shards" / "train").iterdir())
    assert [n[:12] for n in names] == [f"train-{i:06d}" for i in range(4)]  # + "-<version>.h5"


def test_the_store_moves_as_a_whole_and_a_missing_shard_is_refused(shards, tmp_path):
    _, source = shards
    extract(source, tmp_path / "a" / "codes.h5", **FAST)
    before = _rows(tmp_path / "a" / "codes.h5")
    (tmp_path / "a").rename(tmp_path / "b")  # relative shard paths: the index follows its folder
    after = _rows(tmp_path / "b" / "codes.h5")
    assert all(np.array_equal(x, y) for s in before for x, y in zip(before[s], after[s]))
    shard = next((tmp_path / "b" / "codes.shards" / "train").glob("train-000002-*.h5"))
    with open(shard, "ab") as f:  # e.g. redone with other rows, not yet indexed
        f.write(b"\0")
    with pytest.raises(CnnCodesError, match=f"{shard.name} was rewritten after this index; rerun the same"):
        Cache(tmp_path / "b" / "codes.h5")
    shard.unlink()
    with pytest.raises(CnnCodesError, match=f"{shard.name} it names is missing; rerun the same"):
        Cache(tmp_path / "b" / "codes.h5")


def test_rerun_skips_done_shards_without_opening_them_and_redoes_a_changed_one(shards, tmp_path, cli, monkeypatch):
    import cnncodes.sources.webdataset as sharded

    _, source = shards
    out = tmp_path / "out" / "codes.h5"
    extract(source, out, **FAST)
    before = _mtimes(tmp_path / "out" / "codes.shards")
    pattern = str(tmp_path / "wds" / "train-{000000..000003}.tar")
    val = str(tmp_path / "wds" / "val-*.tar")
    probe = ("import sys; from cnncodes.cli import cli\ntry: cli(sys.argv[1:], prog_name='cnncodes')\n"
             "except SystemExit: pass\nprint('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')")
    r = subprocess.run([sys.executable, "-c", probe, "extract", pattern, "--val", val, "-o", str(out), *ARGS],
                       capture_output=True, text=True, timeout=120)
    assert "is up to date (train 10, val 4 codes); nothing to extract" in r.stdout, r.stdout + r.stderr
    assert r.stdout.split()[-1] == "NO_TORCH"  # the no-op rerun stats the shards, nothing more
    # the same bytes, a new mtime: that shard alone is redone; the others are not even opened
    changed = tmp_path / "wds" / "train-000001.tar"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    opened = []
    monkeypatch.setattr(sharded, "read_samples", lambda path: opened.append(Path(path).name) or read_samples(path))
    r = extract(source, out, **FAST)
    assert (r.extracted, r.shards) == (3, {"done": 4, "extracted": 1, "redone": {"changed": 1}, "failed": 0})
    assert opened == ["train-000001.tar"]
    with pytest.raises(CnnCodesError, match=r"train-000000-\w+.h5: an output shard of another configuration \(views: "
                                            r"cache has 0, asked for 1\); write to another -o, or pass --overwrite"):
        extract(source, out, views=1, **FAST)
    after = _mtimes(tmp_path / "out" / "codes.shards")
    assert {k for k in before if before[k] != after.get(k)} == {k for k in before if k.startswith("train-000001-")}
    new = set(after) - set(before)  # its new version, under a new name; the old one removed once indexed
    assert len(new) == 1 and new.pop().startswith("train-000001-")


def test_fit_head_on_the_sharded_store_equals_fit_head_on_its_packed_file(shards, tmp_path, cli, monkeypatch):
    import cnncodes.heads.codes as codes
    from cnncodes.heads import fit_head

    _, source = shards
    out = tmp_path / "codes.h5"
    extract(source, out, **FAST)
    r = cli("pack", out, "-o", tmp_path / "packed.h5")
    assert "packed 14 rows" in r.stdout
    with h5py.File(tmp_path / "packed.h5") as f:
        assert not f["train/features"].is_virtual and "store" not in f.attrs
    _same_rows(out, tmp_path / "packed.h5")
    monkeypatch.setattr(codes, "IN_MEMORY_BYTES", 0)  # the torch head streams blocks from the file
    heads = [fit_head(cache, "linear", 1.0, seed=0) for cache in (out, tmp_path / "packed.h5")]
    (a, ra), (b, rb) = heads
    assert np.array_equal(a.coef, b.coef) and np.array_equal(a.intercept, b.intercept)
    assert ra["splits"]["val"]["accuracy"] == rb["splits"]["val"]["accuracy"]


# --------------------------------------------------------------------------- crashes and processes


def _argv(source_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cnncodes", "extract", str(source_dir / "train-*.tar"), "-o", str(out), *ARGS, *extra]


def test_kill_9_mid_run_then_rerun_redoes_at_most_the_shard_in_progress(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 12})
    write_shards(data, "train", tmp_path / "wds", 1)  # 24 shards: the kill lands long before the last
    out = tmp_path / "out" / "codes.h5"
    proc = subprocess.Popen(_argv(tmp_path / "wds", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "out" / "codes.shards" / "train"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(folder.glob("*.h5"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _mtimes(folder)
    assert 3 <= len(finished) < 24 and not out.exists()
    source = ShardSource({"train": (str(tmp_path / "wds" / "train-*.tar"),)})
    r = extract(source, out, **FAST)
    assert r.shards["done"] == len(finished) and r.shards["extracted"] == 24 - len(finished)
    assert all(_mtimes(folder)[k] == v for k, v in finished.items())  # nothing finished was redone
    assert not list(folder.glob(".*.tmp"))
    extract(source, tmp_path / "reference.h5", **FAST)
    _same_rows(out, tmp_path / "reference.h5")


def test_torchrun_two_processes_give_the_single_process_store_bitwise(tmp_path, monkeypatch):
    """The shared queue, the per-shard outputs and the index give the single process's store. The single run gets a
    rank's share of the cores: on some CPUs oneDNN's convolution rounds differently with another intra-op thread
    count (an AVX512-BF16/AMX Xeon: 2 threads vs 1 differ in the last bits; an EPYC did not)."""
    from cnncodes import runtime

    monkeypatch.setattr(runtime, "process_cores", lambda: max(1, runtime.available_cores() // 2))
    data = write_folder(tmp_path / "data", {"train": 7})
    write_shards(data, "train", tmp_path / "wds", 3)  # 5 shards of 3, 3, 3, 3, 2 samples
    single, multi = tmp_path / "one" / "codes.h5", tmp_path / "two" / "codes.h5"
    extract(ShardSource({"train": (str(tmp_path / "wds" / "train-*.tar"),)}), single, views=1, **FAST)
    cmd = _argv(tmp_path / "wds", multi, "--views", "1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *cmd[1:]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("extracted 14 images (28 codes) from 5 input shards") == 1, run.stdout  # rank 0 reports
    _same_rows(single, multi)
    with Cache(single) as a, Cache(multi) as b:
        assert list(a.paths("train")) == list(b.paths("train"))


# --------------------------------------------------------------------------- bad input


def test_a_pattern_that_matches_nothing_is_one_line(tmp_path, cli):
    for pattern, message in [(tmp_path / "none-*.tar", "this pattern matches no file"),
                             (tmp_path / "x-{000..002}.tar", "x-000.tar: no such shard (from pattern"),
                             (tmp_path / "list.txt", "list.txt: cannot read the shard list")]:
        r = cli("extract", pattern, "-o", tmp_path / "c.h5", *ARGS, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_samples_are_skipped_with_shard_and_key_and_strict_stops(tmp_path, cli):
    data = write_folder(tmp_path / "data", {"train": 2})
    jpg = (data / "train" / "cat" / "000.jpg").read_bytes()
    wds = tmp_path / "wds"
    wds.mkdir()
    write_tar(wds / "a-0.tar", [("k0.jpg", jpg), ("k0.cls", b"0"),
                                ("k1.cls", b"1"),  # no image
                                ("k2.jpg", jpg),  # no label
                                ("k3.jpg", jpg), ("k3.cls", b"5"),  # outside the class list
                                ("k4.jpg", b"not a jpeg"), ("k4.cls", b"1"),  # undecodable
                                ("k0.jpg", jpg), ("k0.cls", b"1"),  # a duplicate key
                                ("k5.jpg", jpg), ("k5.cls", b"1")])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    args = [wds / "a-0.tar", "-o", tmp_path / "c.h5", "--classes", tmp_path / "classes.txt", *ARGS]
    r = cli("extract", *args)
    assert "extracted 2 images" in r.stdout and "skipped 5 samples" in r.stdout
    for key, reason in [("k1", "no image"), ("k2", "no label (no .cls member)"),
                        ("k3", "label 5 is outside the class list (0..1)"), ("k4", "not a readable image"),
                        ("k0", "duplicate key")]:
        assert f"skipped a-0.tar/{key}: {reason}" in r.stderr, r.stderr
    with Cache(tmp_path / "c.h5") as c:
        assert c.classes == ["cat", "dog"] and list(c.labels("train")) == [0, 1] and len(c.skipped("train")) == 5
    r = cli("extract", *args, "--strict", check=False)  # on the finished store, as on a fresh one
    assert r.returncode == 2 and "a-0.tar: a-0.tar/k1: no image" in r.stderr and "--strict" in r.stderr, r.stderr
    args[2] = tmp_path / "strict.h5"
    r = cli("extract", *args, "--strict", check=False)
    assert r.returncode == 2 and "a-0.tar: a-0.tar/k1: no image" in r.stderr and "--strict" in r.stderr, r.stderr
    assert not list((tmp_path / "strict.shards").rglob("*.h5"))


def test_a_truncated_or_unreadable_shard_is_reported_and_the_others_go_on(tmp_path, cli):
    data = write_folder(tmp_path / "data", {"train": 3})
    paths = write_shards(data, "train", tmp_path / "wds", 2)  # 3 shards
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:len(raw) // 2])  # truncated inside a member
    paths[2].unlink()
    paths[2].mkdir()  # cannot be read as a file
    r = cli("extract", tmp_path / "wds" / "train-*.tar", "-o", tmp_path / "c.h5", *ARGS, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "train-000001.tar: truncated" in r.stderr and "samples before it are kept" in r.stderr
    assert f"error: {paths[2]}: cannot read this shard" in r.stderr and "rerun the same command" in r.stderr
    with Cache(tmp_path / "c.h5") as c:  # the index holds every shard that could be read
        assert len(c.files("train")) == 2 and c.features("train").shape[0] >= 2
    r = cli("extract", tmp_path / "wds" / "train-*.tar", "-o", tmp_path / "c.h5", "--strict", *ARGS, check=False)
    assert r.returncode == 2 and "--strict" in r.stderr


def test_string_labels_need_a_class_list_and_json_labels_work(tmp_path, cli):
    data = write_folder(tmp_path / "data", {"train": 1})
    jpg = (data / "train" / "cat" / "000.jpg").read_bytes()
    write_tar(tmp_path / "s.tar", [("a.jpg", jpg), ("a.json", b'{"y": "dog"}'), ("b.jpg", jpg), ("b.json", b'{"y": "cat"}')])
    r = cli("extract", tmp_path / "s.tar", "-o", tmp_path / "c.h5", "--label-key", "y", *ARGS, check=False)
    assert r.returncode == 2 and "sample a: label 'dog' is a class name; pass --classes FILE" in r.stderr, r.stderr
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    cli("extract", tmp_path / "s.tar", "-o", tmp_path / "c.h5", "--label-key", "y", "--classes", tmp_path / "names.txt", *ARGS)
    with Cache(tmp_path / "c.h5") as c:
        assert list(c.labels("train")) == [1, 0]


def test_an_ordinary_cache_is_not_replaced_by_an_index(shards, tmp_path, cli):
    data, source = shards
    extract(data, tmp_path / "c.h5", **FAST)
    with pytest.raises(CnnCodesError, match=r"indexes the codes of another input \(folder, not webdataset\); write to another -o"):
        extract(source, tmp_path / "c.h5", **FAST)
    spec = tmp_path / "wds" / "spec.json"  # the API takes what the CLI takes: here a JSON spec
    spec.write_text(json.dumps({"train": "train-{000000..000003}.tar", "val": ["val-000000.tar"]}))
    r = extract(spec, tmp_path / "spec.h5", **FAST)
    assert r.split_counts == {"train": 10, "val": 4}


def test_the_gpu_path_reads_ahead_on_a_thread_and_gives_the_same_codes(shards, tmp_path, monkeypatch):
    """On CUDA the next batches are read and decoded by a thread while the network runs: the same
    rows, and a bad sample under --strict still stops the run (its error crosses the thread)."""
    import cnncodes.extract.shard_worker as sharded

    _, source = shards
    extract(source, tmp_path / "inline.h5", **FAST)
    threads = []
    real = sharded.prefetch
    monkeypatch.setattr(sharded, "prefetch", lambda items, depth: threads.append(depth) or real(items, depth))
    init = sharded.ShardExtractor.__init__

    def ahead(self, *a, **kw):
        init(self, *a, **kw)
        self.prefetch = True

    monkeypatch.setattr(sharded.ShardExtractor, "__init__", ahead)
    extract(source, tmp_path / "ahead.h5", **FAST)
    assert len(threads) == 5
    _same_rows(tmp_path / "inline.h5", tmp_path / "ahead.h5")
    bad = tmp_path / "bad.tar"
    write_tar(bad, [("a.jpg", b"not a jpeg"), ("a.cls", b"0")])
    with pytest.raises(CnnCodesError, match="bad.tar/a: not a readable image.*--strict"):
        extract(ShardSource({"train": (str(bad),)}), tmp_path / "strict.h5", strict=True, **FAST)
