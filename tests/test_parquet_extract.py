"""Parquet input end to end: `cnncodes extract` on files written by `datasets` gives the codes of the
same images read from a folder, bitwise, through the same shard pipeline (resume, index, no-op)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_folder

datasets = pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

from datasets import ClassLabel, Dataset, Features, Image  # noqa: E402

from cnncodes.extract import extract  # noqa: E402
from cnncodes.store import Cache  # noqa: E402

datasets.disable_progress_bars()
ARGS = ["--weights", "none", "--image-size", "64", "--batch-size", "3", "-q"]
HUB_SPLITS = {"train": "train", "val": "validation"}


def write_hub(folder: Path, dest: Path) -> Path:
    """The folder's images as the hub lays out a dataset: DEST/data/<split>-0000k-of-0000n.parquet,
    one file per class here (so a file batches the same images as the folder's class shard), the
    bytes embedded, labels a ClassLabel."""
    names = sorted(p.name for p in (folder / "train").iterdir())
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    for split, hub in HUB_SPLITS.items():
        for k, name in enumerate(names):
            files = sorted((folder / split / name).glob("*.jpg"))
            ds = Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                    "label": [k] * len(files)}, features=features)
            (dest / "data").mkdir(parents=True, exist_ok=True)
            ds.to_parquet(dest / "data" / f"{hub}-{k:05d}-of-{len(names):05d}.parquet")
    return dest


def _rows(path: Path) -> dict:
    with Cache(path) as c:
        return {s: (c.features(s)[()], c.labels(s), c.views(s), c.classes) for s in c.splits}


def test_parquet_gives_the_folder_codes_bitwise_from_the_cli(tmp_path, cli):
    folder = write_folder(tmp_path / "data", {"train": 4, "val": 2})
    hub = write_hub(folder, tmp_path / "hub")
    cli("extract", folder, "-o", tmp_path / "folder.h5", *ARGS)
    r = cli("extract", hub, "-o", tmp_path / "pq.h5", *ARGS)
    assert "extracted 12 images (12 codes) from 4 input shards" in r.stdout, r.stdout
    a, b = _rows(tmp_path / "folder.h5"), _rows(tmp_path / "pq.h5")
    assert a.keys() == b.keys() == {"train", "val"}
    for split in a:
        for x, y in zip(a[split], b[split]):
            assert np.array_equal(np.asarray(x), np.asarray(y)), split
    with Cache(tmp_path / "pq.h5") as c:
        assert c.paths("train")[0] == "train-00000-of-00002.parquet/0"
    again = cli("extract", hub, "-o", tmp_path / "pq.h5", *ARGS)  # unchanged files: answered by stats
    assert "is up to date (train 8, val 4 codes)" in again.stdout


def test_a_replaced_parquet_file_is_redone_alone(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 3, "val": 1})
    hub = write_hub(folder, tmp_path / "hub")
    kw = dict(weights="none", image_size=32, progress=False, log=lambda m: None)
    extract(hub / "data", tmp_path / "pq.h5", **kw)
    first = hub / "data" / "train-00000-of-00002.parquet"
    first.write_bytes(first.read_bytes())  # same bytes, a new mtime: its shard alone is redone
    r = extract(hub / "data", tmp_path / "pq.h5", **kw)
    assert (r.extracted, r.shards["done"], r.shards["redone"]) == (3, 3, {"changed": 1})
