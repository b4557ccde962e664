"""Hugging Face Parquet files as a ShardSource, written by `datasets` itself (the reference writer).

Small generated 32 px JPEGs/PNGs; each test asserts the items' bytes, labels, keys or the message.
No torch, no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from datasets import ClassLabel, Dataset, Features, Image, Value  # noqa: E402
from datasets.table import embed_table_storage  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from cnncodes.errors import CnnCodesError  # noqa: E402
from cnncodes.sources.base import ShardDamaged, ShardSource  # noqa: E402
from cnncodes.sources.parquet import is_parquet_input, parquet_source, split_of  # noqa: E402

datasets.disable_progress_bars()
NAMES = ["cat", "dog", "fox"]


def images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """n small distinct images, JPEG and PNG alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        path = folder / (f"{i:03d}.jpg" if i % 2 == 0 else f"{i:03d}.png")
        PILImage.new("RGB", (32, 32), (7 * i % 256, 255 - i, 40)).save(path)
        out.append(path)
    return out


def dataset(paths: list, labels: list, label_feature=None) -> Dataset:
    feature = label_feature or ClassLabel(names=NAMES)
    return Dataset.from_dict({"image": [str(p) for p in paths], "label": labels},
                             features=Features({"image": Image(), "label": feature}))


def embedded(ds: Dataset) -> Dataset:
    """The bytes embedded, as push_to_hub writes them (path = the file's base name)."""
    return ds.with_format("arrow").map(embed_table_storage, batched=True)


def read_all(source, shard) -> list:
    return list(source.items(shard))


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Path, dict]:
    """DIR/data/{train-0000k-of-00002, validation-00000-of-00001, test-00000-of-00001}.parquet,
    bytes embedded; returns DIR and each split's (image files, labels) in row order."""
    files = images(tmp_path / "img", 9)
    labels = [i % 3 for i in range(9)]
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    train = embedded(dataset(files[:5], labels[:5]))
    for k in range(2):
        train.shard(2, k, contiguous=True).to_parquet(data / f"train-{k:05d}-of-00002.parquet")
    embedded(dataset(files[5:7], labels[5:7])).to_parquet(data / "validation-00000-of-00001.parquet")
    embedded(dataset(files[7:], labels[7:])).to_parquet(data / "test-00000-of-00001.parquet")
    return tmp_path / "hub", {"train": (files[:5], labels[:5]), "val": (files[5:7], labels[5:7]),
                              "test": (files[7:], labels[7:])}


def test_hub_layout_gives_splits_bytes_labels_and_class_names(hub):
    root, expected = hub
    source = parquet_source(root)
    assert isinstance(source, ShardSource)
    shards = source.shards()
    assert list(shards) == ["train", "val", "test"]
    assert [s.name for s in shards["train"]] == ["train-00000-of-00002", "train-00001-of-00002"]
    for split, (files, labels) in expected.items():
        items = [item for shard in shards[split] for item in read_all(source, shard)]
        assert [it.data for it in items] == [f.read_bytes() for f in files]
        assert [it.label for it in items] == labels
        assert [it.ext for it in items] == [f.suffix.lstrip(".") for f in files]
        assert all(it.problem is None and it.path is None for it in items)
    first = shards["train"][0]
    assert first.path == str(root / "data" / "train-00000-of-00002.parquet")
    assert (first.size, first.mtime_ns) == (os.stat(first.path).st_size, os.stat(first.path).st_mtime_ns)
    keys = [it.key for it in read_all(source, shards["train"][1])]
    assert keys == ["train-00001-of-00002.parquet/0", "train-00001-of-00002.parquet/1"]
    assert keys == [it.key for it in read_all(parquet_source(root), shards["train"][1])]  # stable
    assert source.classes() == NAMES
    assert source.identity() == {"input": "parquet", "image_col": "image", "label_col": "label", "classes": NAMES}


def test_data_subfolder_glob_and_brace_patterns_name_the_same_files(hub):
    root, _ = hub
    everything = parquet_source(root).shards()
    assert parquet_source(root / "data").shards() == everything
    assert parquet_source(root / "data" / "*.parquet").shards() == everything
    braces = parquet_source(root / "data" / "train-{00000..00001}-of-00002.parquet").shards()
    assert braces == {"train": everything["train"]}
    single = parquet_source(root / "data" / "test-00000-of-00001.parquet").shards()
    assert single == {"train": everything["test"]}  # one file is the train split, whatever its name
    with pytest.raises(CnnCodesError, match="matches no file"):
        parquet_source(root / "data" / "train-{00000..00002}-of-00002.parquet").shards()


def test_split_names_follow_datasets():
    assert split_of("/x/validation-00000-of-00003.parquet") == "val"
    assert split_of("valid-00001-of-00003.parquet") == "val"
    assert split_of("train-00000-of-00001.parquet") == "train"
    assert split_of("unsupervised-00000-of-00001.parquet") == "unsupervised"
    assert split_of("test.parquet") == "test"
    assert split_of("dev_2.parquet") == "val"
    assert split_of("part-0.parquet") == "train"


def test_is_parquet_input(hub, tmp_path):
    root, _ = hub
    assert is_parquet_input(root) and is_parquet_input(root / "data")
    assert is_parquet_input("x/train-*.parquet") and is_parquet_input(root / "data" / "test-00000-of-00001.parquet")
    assert not is_parquet_input(tmp_path / "img") and not is_parquet_input("shards-{0..3}.tar")


def test_shards_only_stat_the_files(tmp_path, monkeypatch):
    junk = tmp_path / "train-00000-of-00001.parquet"
    junk.write_bytes(b"not parquet at all")
    monkeypatch.setattr(pq, "ParquetFile", None)  # opening a file would fail
    shards = parquet_source(tmp_path).shards()
    assert [(s.name, s.size) for s in shards["train"]] == [("train-00000-of-00001", 18)]


def test_path_only_images_are_read_as_datasets_reads_them(tmp_path, monkeypatch):
    files = images(tmp_path / "img", 3)
    dataset(files, [0, 1, 2]).to_parquet(tmp_path / "abs.parquet")  # absolute paths, bytes null
    assert pq.read_table(tmp_path / "abs.parquet").column("image")[0].as_py()["bytes"] is None
    source = parquet_source(tmp_path / "abs.parquet")
    items = read_all(source, source.shards()["train"][0])
    assert [it.data for it in items] == [f.read_bytes() for f in files]
    assert [it.ext for it in items] == ["jpg", "png", "jpg"]

    monkeypatch.chdir(tmp_path)  # relative paths: against the working directory, as datasets does
    dataset([Path("img") / f.name for f in files], [0, 1, 2]).to_parquet(tmp_path / "rel.parquet")
    source = parquet_source(tmp_path / "rel.parquet")
    assert [it.data for it in read_all(source, source.shards()["train"][0])] == [f.read_bytes() for f in files]
    assert datasets.Dataset.from_parquet(str(tmp_path / "rel.parquet"))[0]["image"].size == (32, 32)
    monkeypatch.chdir(tmp_path / "img")
    with pytest.raises(CnnCodesError, match=r"rel\.parquet: row 0: .*'img/000\.jpg' \(relative.*embed_table_storage"):
        read_all(source, source.shards()["train"][0])


def test_remote_path_only_image_is_refused(tmp_path):
    table = pa.table({"image": [{"bytes": None, "path": "hf://datasets/x/y/a.jpg"}], "label": [0]})
    pq.write_table(table, tmp_path / "remote.parquet")
    source = parquet_source(tmp_path / "remote.parquet")
    with pytest.raises(CnnCodesError, match="not embedded, only a remote path"):
        read_all(source, source.shards()["train"][0])


def test_plain_binary_and_int_columns_without_metadata(tmp_path):
    files = images(tmp_path / "img", 4)
    table = pa.table({"id": ["a", "b", "c", "d"], "jpeg": [f.read_bytes() for f in files], "label": [2, 0, -1, 5]})
    pq.write_table(table, tmp_path / "plain.parquet")
    source = parquet_source(tmp_path / "plain.parquet")
    items = read_all(source, source.shards()["train"][0])
    assert [it.data for it in items[:2]] == [f.read_bytes() for f in files[:2]]
    assert [it.label for it in items[:2]] == [2, 0]
    assert [it.problem for it in items[2:]] == ["no label", None]  # -1: datasets' "no label"
    assert source.classes() is None
    assert source.identity() == {"input": "parquet", "image_col": "jpeg", "label_col": "label", "classes": None}


def test_string_labels_make_a_sorted_class_list_over_all_files(tmp_path):
    files = images(tmp_path / "img", 4)
    feature = Value("string")
    dataset(files[:2], ["zebra", "ant"], feature).to_parquet(tmp_path / "train-00000-of-00001.parquet")
    dataset(files[2:], ["moth", None], feature).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    source = parquet_source(tmp_path)
    assert source.classes() == ["ant", "moth", "zebra"]
    shards = source.shards()
    assert [it.label for it in read_all(source, shards["train"][0])] == [2, 0]
    moth, missing = read_all(source, shards["test"][0])
    assert (moth.label, moth.data, missing.problem) == (1, files[2].read_bytes(), "no label")


def test_missing_labels_images_and_out_of_range_classes_are_row_problems(tmp_path):
    files = images(tmp_path / "img", 5)
    table = dataset(files, [0, -1, 1, 2, 0]).data.table  # -1: datasets' "no label"
    table = table.set_column(1, "label", pa.array([0, -1, None, 7, 1], pa.int64()))
    empty = pa.array([{"bytes": None, "path": None}], table.schema.field("image").type)
    table = table.set_column(0, "image", pa.concat_arrays([table.column("image").combine_chunks()[:4], empty]))
    pq.write_table(table, tmp_path / "x.parquet")
    source = parquet_source(tmp_path / "x.parquet")
    items = read_all(source, source.shards()["train"][0])
    assert (items[0].problem, items[0].data, items[0].label) == (None, files[0].read_bytes(), 0)
    assert [it.problem for it in items[1:3]] == ["no label", "no label"]
    assert items[3].problem == "label 7 is outside the class list (0..2)" and items[3].data is None
    assert items[4].problem == "no image (the cell has neither bytes nor a path)"


def test_ambiguous_or_missing_columns_name_the_file_columns_and_option(tmp_path):
    files = images(tmp_path / "img", 2)
    two = Dataset.from_dict({"a": [str(f) for f in files], "b": [str(f) for f in files], "label": [0, 1]},
                            features=Features({"a": Image(), "b": Image(), "label": ClassLabel(names=NAMES)}))
    two.to_parquet(tmp_path / "two.parquet")
    with pytest.raises(CnnCodesError, match=r"two\.parquet: several columns could hold the images \(a, b\); "
                                            r"columns: a \(struct.*, label \(int64\); pass image_col=NAME"):
        parquet_source(tmp_path / "two.parquet").identity()
    source = parquet_source(tmp_path / "two.parquet", image_col="b")
    assert [it.data for it in read_all(source, source.shards()["train"][0])] == [f.read_bytes() for f in files]

    pq.write_table(pa.table({"img": [b"x"], "y": [1]}), tmp_path / "nolabel.parquet")
    with pytest.raises(CnnCodesError, match=r"nolabel\.parquet: no label column found; columns: img \(binary\), "
                                            r"y \(int64\); pass label_col=NAME"):
        parquet_source(tmp_path / "nolabel.parquet").identity()
    assert parquet_source(tmp_path / "nolabel.parquet", label_col="y").identity()["label_col"] == "y"
    with pytest.raises(CnnCodesError, match="no column 'z'.*pass label_col"):
        parquet_source(tmp_path / "nolabel.parquet", label_col="z").identity()


def test_files_with_other_class_names_are_refused(tmp_path):
    files = images(tmp_path / "img", 2)
    dataset(files[:1], [0]).to_parquet(tmp_path / "train-00000-of-00002.parquet")
    dataset(files[1:], [0], ClassLabel(names=["x", "y"])).to_parquet(tmp_path / "train-00001-of-00002.parquet")
    source = parquet_source(tmp_path)
    with pytest.raises(CnnCodesError, match=r"train-00001-of-00002\.parquet: its columns read as .*\['x', 'y'\]"):
        read_all(source, source.shards()["train"][1])


def test_truncated_or_foreign_files_cannot_be_opened(tmp_path):
    files = images(tmp_path / "img", 4)
    embedded(dataset(files, [0, 1, 2, 0])).to_parquet(tmp_path / "train-00000-of-00002.parquet")
    whole = (tmp_path / "train-00000-of-00002.parquet").read_bytes()
    (tmp_path / "train-00001-of-00002.parquet").write_bytes(whole[: len(whole) // 2])
    source = parquet_source(tmp_path)
    good, cut = source.shards()["train"]
    assert len(read_all(source, good)) == 4  # columns and classes come from the readable file
    with pytest.raises(OSError, match="not a readable Parquet file.*cut short"):
        read_all(source, cut)
    (tmp_path / "other.parquet").write_text("name,label\n")
    with pytest.raises(OSError, match="not a readable Parquet file"):
        read_all(source, parquet_source(tmp_path / "other.parquet").shards()["train"][0])
    with pytest.raises(CnnCodesError, match="no readable Parquet file"):
        parquet_source(tmp_path / "other.parquet").identity()


def test_corrupt_row_group_keeps_the_rows_before_it(tmp_path):
    files = images(tmp_path / "img", 6)
    table = embedded(dataset(files, [0, 1, 2, 0, 1, 2])).data.table
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=2)
    meta = pq.ParquetFile(path).metadata
    offset = meta.row_group(2).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    source = parquet_source(path)
    got = []
    with pytest.raises(ShardDamaged, match="row group 3 of 3"):
        for item in source.items(source.shards()["train"][0]):
            got.append(item)
    assert [it.data for it in got] == [f.read_bytes() for f in files[:4]]


def test_duplicate_file_names_are_refused(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "train-00000-of-00001.parquet").write_bytes(b"x")
    with pytest.raises(CnnCodesError, match="same file name"):
        parquet_source(str(tmp_path / "{a,b}" / "*.parquet")).shards()


def test_missing_pyarrow_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CnnCodesError, match=r"pip install 'cnncodes\[parquet\]'"):
        parquet_source(tmp_path / "x.parquet").classes()


def test_import_is_cheap():
    code = "import sys, cnncodes.sources.parquet; assert 'pyarrow' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
