"""The sharded store can be trusted from outside: a same-size file in a shard's place is refused,
the index never reads another store's shards whatever the working directory, and `cnncodes info`
piped into `head` exits quietly.

Stores are written with `write_output_shard` + `write_index` directly (no network, no torch): every
row of store A holds 100 + its shard's number, of store B 200 + it, so a read says whose rows it got.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cnncodes.errors import CnnCodesError
from cnncodes.store import Cache, CacheConfig, SplitRows
from cnncodes.store import sharded
from cnncodes.store.sharded import read_output_shard, write_index, write_output_shard

DIM = 4
CONFIG = CacheConfig("resnet18", "none:seed0", "none", "fp32",
                     {"resize": 64, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})


def make_store(folder: Path, base: int, shards: int = 3, rows: int = 2) -> Path:
    """folder/codes.h5 over `shards` output shards of `rows` rows (features = base + shard number);
    the shards have the same size (same-length names and attributes)."""
    paths = [folder / "codes.shards" / "train" / f"train-{i:06d}.h5" for i in range(shards)]
    for i, p in enumerate(paths):
        r = SplitRows(np.full((rows, DIM), base + i, np.float32), np.zeros(rows, np.int64),
                      [f"train-{i:06d}.tar/{k}" for k in range(rows)], np.zeros(rows, np.int16))
        write_output_shard(p, r, {"source": f"/data/train-{i:06d}.tar", "source_size": 1, "source_mtime_ns": 1,
                                  "samples": rows, "damaged": 0, "config": CONFIG.to_json(), "input": "{}",
                                  "split": "train", "max_label": 0})
    index = folder / "codes.h5"
    write_index(index, CONFIG, ["a"], DIM, {"train": [read_output_shard(p) for p in paths]}, {"train": []}, {}, "", {})
    return index


def shard(index: Path, i: int) -> Path:
    return index.parent / "codes.shards" / "train" / f"train-{i:06d}.h5"


def cache_rows(index: Path) -> np.ndarray:
    with Cache(index) as c:
        return c.features("train")[:, 0]


def h5py_rows(index: Path) -> np.ndarray:
    with h5py.File(index, "r") as f:
        return f["train/features"][:, 0]


# --------------------------------------------------------------------------- a shard replaced


def test_every_shard_has_an_id_the_index_records(tmp_path):
    index = make_store(tmp_path, 100)
    ids = []
    for i in range(3):
        with h5py.File(shard(index, i), "r") as f:
            ids.append(f.attrs["shard_id"])
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    with h5py.File(index, "r") as f:
        assert list(f["train/shards/id"].asstr()[()]) == ids
    assert read_output_shard(shard(index, 0)).origin["shard_id"] == ids[0]


def test_a_copy_of_the_neighbour_shard_in_its_place_is_refused(tmp_path):
    index = make_store(tmp_path, 100)
    assert shard(index, 1).stat().st_size == shard(index, 2).stat().st_size  # only the size: it would pass
    shutil.copyfile(shard(index, 2), shard(index, 1))
    with pytest.raises(CnnCodesError, match=r"train-000001.h5 is not the one this index was written with.*"
                                            r"rerun the same `cnncodes extract`") as e:
        Cache(index)
    assert "\n" not in str(e.value)


def test_an_in_place_rewrite_keeping_the_size_is_refused(tmp_path):
    index = make_store(tmp_path, 100)
    inode = shard(index, 0).stat().st_ino
    data = shard(index, 2).read_bytes()
    with open(shard(index, 0), "r+b") as f:  # the same file, other bytes of the same length
        f.write(data)
    assert shard(index, 0).stat().st_ino == inode
    with pytest.raises(CnnCodesError, match="train-000000.h5 is not the one this index was written with"):
        Cache(index)


def test_a_copy_of_the_store_that_lost_its_mtimes_opens(tmp_path):
    index = make_store(tmp_path / "a", 100)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)  # cp -r: new mtimes
    copy = tmp_path / "b" / "codes.h5"
    assert shard(copy, 0).stat().st_mtime_ns != shard(index, 0).stat().st_mtime_ns
    assert cache_rows(copy).tolist() == [100, 100, 101, 101, 102, 102]
    os.utime(shard(index, 1), ns=(1, 1))  # touched, not changed
    assert cache_rows(index).tolist() == [100, 100, 101, 101, 102, 102]


def test_an_unchanged_store_opens_without_opening_a_shard(tmp_path, monkeypatch):
    index = make_store(tmp_path, 100)

    def opened(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(sharded, "_shard_id", opened)
    assert cache_rows(index).tolist() == [100, 100, 101, 101, 102, 102]


def test_an_index_written_before_shard_ids_keeps_the_size_check(tmp_path):
    index = make_store(tmp_path, 100)
    with h5py.File(index, "r+") as f:
        del f["train/shards/id"]
    shutil.copyfile(shard(index, 2), shard(index, 1))
    assert cache_rows(index).tolist() == [100, 100, 102, 102, 102, 102]  # what it could not tell
    with open(shard(index, 1), "ab") as f:
        f.write(b"\0")
    with pytest.raises(CnnCodesError, match="train-000001.h5 was rewritten after this index"):
        Cache(index)


# --------------------------------------------------------------------------- another store's shards


def test_hdf5_falls_back_to_the_working_directory_for_plain_relative_paths(tmp_path, monkeypatch):
    """The hazard: with `codes.shards/train/x.h5` as the source name (indexes of cnncodes before the
    marker folder), HDF5 tries the index's folder, then the working directory: where this store's
    shard is missing, plain h5py run from another store's folder reads that store's rows."""
    monkeypatch.setattr(sharded, "_store_marker", lambda out, entries: None)
    other = make_store(tmp_path / "a", 100)
    index = make_store(tmp_path / "b", 200)
    shard(index, 1).unlink()
    monkeypatch.chdir(other.parent)
    assert h5py_rows(Path("..") / "b" / "codes.h5").tolist() == [200, 200, 101, 101, 202, 202]  # a's rows
    with pytest.raises(CnnCodesError, match="train-000001.h5 it names is missing"):
        Cache(index)


def test_the_index_never_reads_another_stores_shards_from_the_working_directory(tmp_path, monkeypatch):
    other = make_store(tmp_path / "a", 100)
    index = make_store(tmp_path / "b", 200)
    with h5py.File(index, "r") as f:
        names = {m.file_name for m in f["train/features"].virtual_sources()}
    marker = next((index.parent / "codes.shards").glob(".store-*"))
    assert names == {f"codes.shards/{marker.name}/../train/train-{i:06d}.h5" for i in range(3)}
    monkeypatch.chdir(other.parent)
    for path in (index, Path("..") / "b" / "codes.h5"):
        assert h5py_rows(path).tolist() == [200, 200, 201, 201, 202, 202]
        assert cache_rows(path).tolist() == [200, 200, 201, 201, 202, 202]
    shard(index, 1).unlink()
    assert h5py_rows(index)[2:4].tolist() == [-1, -1] or np.isnan(h5py_rows(index)[2:4]).all()  # fill, never a's
    with pytest.raises(CnnCodesError, match="train-000001.h5 it names is missing"):
        Cache(index)


def test_the_marker_folder_is_reused_and_its_loss_refused(tmp_path):
    make_store(tmp_path, 100)
    markers = list((tmp_path / "codes.shards").glob(".store-*"))
    make_store(tmp_path, 100)  # indexed again: the same marker
    assert list((tmp_path / "codes.shards").glob(".store-*")) == markers and (markers[0] / "README").is_file()
    (tmp_path / "b").mkdir()
    (tmp_path / "codes.h5").rename(tmp_path / "b" / "codes.h5")
    (tmp_path / "codes.shards").rename(tmp_path / "b" / "codes.shards")  # the store moves as a whole
    assert cache_rows(tmp_path / "b" / "codes.h5").tolist() == [100, 100, 101, 101, 102, 102]
    shutil.rmtree(tmp_path / "b" / "codes.shards" / markers[0].name)
    with pytest.raises(CnnCodesError, match=rf"the folder .*{markers[0].name} that names its shards is missing"):
        Cache(tmp_path / "b" / "codes.h5")


def test_hdf5_vds_prefix_cannot_point_the_index_at_another_store(tmp_path, monkeypatch):
    other = make_store(tmp_path / "a", 100)
    index = make_store(tmp_path / "b", 200)
    code = "import h5py, sys; f = h5py.File(sys.argv[1], 'r'); print(f['train/features'][:, 0].tolist())"
    env = {**os.environ, "HDF5_VDS_PREFIX": str(other.parent)}  # HDF5 tries it before the index's folder
    out = subprocess.run([sys.executable, "-c", code, str(index)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[200.0, 200.0, 201.0, 201.0, 202.0, 202.0]"
    monkeypatch.setattr(sharded, "_store_marker", lambda out, entries: None)
    legacy = make_store(tmp_path / "c", 300)
    out = subprocess.run([sys.executable, "-c", code, str(legacy)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[100.0, 100.0, 101.0, 101.0, 102.0, 102.0]"  # the hazard, without the marker
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(other.parent))
    with pytest.raises(CnnCodesError, match="HDF5_VDS_PREFIX is set"):
        Cache(legacy)
    assert cache_rows(index).tolist() == [200, 200, 201, 201, 202, 202]


# --------------------------------------------------------------------------- the command line


def test_info_warns_about_an_index_without_the_marker_folder(tmp_path, monkeypatch, cli):
    index = make_store(tmp_path / "a", 100)
    assert "warning" not in cli("info", index).stdout
    monkeypatch.setattr(sharded, "_store_marker", lambda out, entries: None)
    legacy = make_store(tmp_path / "b", 200)
    lines = [line for line in cli("info", legacy).stdout.splitlines() if line.startswith("warning")]
    assert len(lines) == 1 and "working directory" in lines[0] and "open it from its own folder" in lines[0]


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_info_into_a_closed_pipe_exits_quietly(tmp_path, reader):
    index = make_store(tmp_path, 100)
    cmd = f"{sys.executable} -m cnncodes info {index} | {reader}; echo \"rc=${{PIPESTATUS[0]}}\""
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    if reader == "true":  # exits at once: every write of info's finds the pipe closed
        assert lines == ["rc=141"]
    else:  # head may be gone before info's second line, or after its last
        assert lines[0].startswith(f"{index}: resnet18") and lines[1] in ("rc=141", "rc=0")
