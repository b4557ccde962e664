"""Hugging Face Parquet files as input (torch-free; pyarrow is imported only to read a file).

DATA is one `.parquet` file (the train split, whatever its name), a folder holding such files (or
its `data/` subfolder: the Hub's `data/train-00000-of-00003.parquet`), or a glob/brace pattern. A
file's split is its name's prefix before `-NNNNN-of-NNNNN` (else its first word when that is a
split word, else "train"), with `datasets`' split words: validation/valid/dev/val -> "val",
test/testing/eval/evaluation -> "test", train/training -> "train".

One input shard per file, not per row group: a file is the unit the Hub and `datasets` write,
upload and replace (a new revision rewrites whole files), so it is the unit whose change must redo
an output shard, and a stat signs it without opening it (a row group's signature would need the
footer of every file read at each plan). A file holds at most a few hundred MB (the Hub's shards),
a few minutes of one GPU's work, so the shard count stays useful for torchrun. Splitting large files
by row group can come later behind an option.

Columns: the `Image` feature (schema metadata), else the one {bytes, path} struct, else the one
binary column; the one `ClassLabel` feature, else `label`/`labels` (integers: indices; strings:
class names, sorted over every file's label column, read once); `image_col`/`label_col` override;
-1 or null: "no label" (skipped, reported). A path-only image (bytes null, as `to_parquet` writes
images loaded from files) is read as datasets' `Image.decode_example` reads it: absolute as is,
relative to the working directory; a missing or remote one stops the run. See docs/parquet.md.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CnnCodesError
from .base import InputShard, Item, ShardDamaged, class_index

SUFFIX = ".parquet"
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "dev": "val",
               "val": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
BATCH_ROWS = 64  # rows converted to Python at a time (a row group may hold thousands of images)
INSTALL = "reading Parquet files needs pyarrow: pip install 'cnncodes[parquet]'"
EMBED = ("ds.with_format('arrow').map(datasets.table.embed_table_storage, batched=True).to_parquet(...), "
         "as push_to_hub does")
_SHARDED = re.compile(r"^(.+?)-\d{5}-of-\d{5}")  # the Hub's {split}-00000-of-00003.parquet
_WORD = re.compile(r"[-._ 0-9]")  # datasets' separators around a split word in a file name
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def is_parquet_input(data: str | os.PathLike) -> bool:
    """True when DATA names Parquet files: a `.parquet` file or pattern, or a folder holding them."""
    text = str(data)
    return text.lower().endswith(SUFFIX) or (os.path.isdir(text) and bool(_folder_files(Path(text))))


def parquet_source(data: str | os.PathLike, image_col: str | None = None,
                   label_col: str | None = None) -> ParquetSource:
    """DATA (a file, a folder or a pattern) as a ShardSource; columns auto-detected unless named."""
    return ParquetSource(str(data), image_col, label_col)


@dataclass(frozen=True)
class Columns:
    """The image and label columns of a file, and how its labels read: "classlabel" (indices into
    `names`, from the schema), "int" (indices) or "string" (class names)."""

    image: str
    label: str
    kind: str
    names: tuple[str, ...] | None = None
    file: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"image '{self.image}', label '{self.label}' ({self.kind}{f' {list(self.names)}' if self.names else ''})"


class ParquetSource:
    """Parquet files as input shards (see the module docstring); columns and classes are read
    once, from the first readable file's footer (and, for string labels, every label column)."""

    def __init__(self, data: str, image_col: str | None = None, label_col: str | None = None):
        self.data, self.image_col, self.label_col = data, image_col, label_col
        self._columns: Columns | None = None
        self._string_names: list[str] | None = None

    def shards(self) -> dict[str, list[InputShard]]:
        """Each split's files in name order, each signed by a stat (never opened)."""
        return {split: [_signed(p) for p in paths] for split, paths in parquet_files(self.data).items()}

    def columns(self) -> Columns:
        """The image and label columns, resolved from the first file whose footer reads."""
        if self._columns is None:
            errors = []
            for path in sorted(p for files in parquet_files(self.data).values() for p in files):
                try:
                    with _open(path) as pf:
                        self._columns = resolve_columns(path, pf.schema_arrow, self.image_col, self.label_col)
                        break
                except OSError as e:
                    errors.append(f"{path}: {e}")
            else:
                raise CnnCodesError(f"no readable Parquet file in {self.data} ({errors[0]})")
        return self._columns

    def classes(self) -> list[str] | None:
        """ClassLabel names; for string labels the sorted distinct names of every file's label
        column (read once: a fixed list, the same on every rank, before any shard); else None."""
        cols = self.columns()
        if cols.kind == "string":
            if self._string_names is None:
                self._string_names = _string_classes(parquet_files(self.data), cols.label)
            return list(self._string_names)
        return None if cols.names is None else list(cols.names)

    def identity(self) -> dict:
        """What, beside the images, decides the rows."""
        cols = self.columns()
        return {"input": "parquet", "image_col": cols.image, "label_col": cols.label, "classes": self.classes()}

    def items(self, shard: InputShard) -> Iterator[Item]:
        """The file's rows as items, keyed `<file name>/<row index>`. OSError when the file cannot
        be opened (not Parquet, or cut short: its footer is gone); ShardDamaged after the rows of
        the row groups before a corrupt one; CnnCodesError when its columns differ from the first
        file's or a path-only image is missing."""
        cols = self.columns()
        names = self.classes()
        classes = None if cols.kind == "int" or names is None else {c: i for i, c in enumerate(names)}
        with _open(shard.path) as pf:
            found = resolve_columns(shard.path, pf.schema_arrow, cols.image, cols.label)
            if found != cols:
                raise CnnCodesError(f"{shard.path}: its columns read as {found} but as {cols} in "
                                    f"{cols.file}; every file of one input needs the same image and label columns")
            name, row = Path(shard.path).name, 0
            for batch in _batches(pf, [cols.image, cols.label]):
                for image, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    yield _item(shard.path, f"{name}/{row}", row, image, label, cols.kind, classes)
                    row += 1


def parquet_files(data: str) -> dict[str, list[str]]:
    """DATA's Parquet files (absolute paths) per split, each split's in name order."""
    path = Path(data)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise CnnCodesError(f"{data}: no .parquet files in this folder or its data/ subfolder; point DATA "
                                f"at the folder holding them (as DIR/data/train-00000-of-00003.parquet) or at a file")
    elif any(c in data for c in "*?[{"):
        files = _expand(data)
    elif path.is_file():
        return {"train": [os.path.abspath(data)]}
    else:
        raise CnnCodesError(f"{data}: no such Parquet file, folder or pattern")
    seen: dict[str, str] = {}
    for f in files:
        if seen.setdefault(Path(f).name, f) != f:
            raise CnnCodesError(f"{f}: same file name as {seen[Path(f).name]}; rows are keyed '<file name>/<row>', "
                                f"so the files of one input need distinct names")
    splits: dict[str, list[str]] = {}
    for f in files:
        splits.setdefault(split_of(f), []).append(f)
    order = [s for s in ("train", "val", "test") if s in splits] + sorted(set(splits) - {"train", "val", "test"})
    return {s: sorted(splits[s]) for s in order}


def split_of(path: str) -> str:
    """A file's split: the Hub's `{split}-NNNNN-of-NNNNN` prefix, else its first word when that is a
    split word (`validation.parquet`), else "train"; validation/dev/... -> "val" as in datasets."""
    name = Path(path).name
    sharded = _SHARDED.match(name)
    word = sharded.group(1) if sharded else _WORD.split(name, maxsplit=1)[0]
    return SPLIT_WORDS.get(word.lower(), word if sharded else "train")


def resolve_columns(path: str, schema, image_col: str | None, label_col: str | None) -> Columns:
    """The file's image and label columns (auto-detected unless named), checked; CnnCodesError in
    one line naming the file, its columns and the option to pass when missing or ambiguous."""
    import pyarrow as pa

    features = _features(schema)
    typed = {f: (v.get("_type") if isinstance(v, dict) else None) for f, v in features.items()}
    if image_col is None:
        found = [f for f, t in typed.items() if t == "Image"]
        found = found or [f.name for f in schema if _holds_image(f.type, binary=False)]
        found = found or [f.name for f in schema if _holds_image(f.type)]
        image_col = _one(path, schema, found, "image", "image_col")
    if label_col is None:
        found = [f for f, t in typed.items() if t == "ClassLabel"]
        found = found or [n for n in ("label", "labels") if n in schema.names]
        label_col = _one(path, schema, found, "label", "label_col")
    for col, what in ((image_col, "image"), (label_col, "label")):
        if col not in schema.names:
            raise CnnCodesError(f"{path}: no column '{col}' (columns: {_listing(schema)}); pass {what}_col=NAME")
    t = schema.field(image_col).type
    if not _holds_image(t):
        raise CnnCodesError(f"{path}: column '{image_col}' ({t}) holds no image bytes (an Image feature or a binary "
                            f"column); pass image_col=NAME (columns: {_listing(schema)})")
    t = schema.field(label_col).type
    if typed.get(label_col) == "ClassLabel":
        return Columns(image_col, label_col, "classlabel", tuple(features[label_col].get("names") or ()) or None, path)
    if pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return Columns(image_col, label_col, "int" if pa.types.is_integer(t) else "string", None, path)
    raise CnnCodesError(f"{path}: column '{label_col}' ({t}) holds neither class indices nor class names; "
                        f"pass label_col=NAME (columns: {_listing(schema)})")


def _holds_image(t, binary: bool = True) -> bool:
    """An Image struct ({bytes, path}) or, with `binary`, a binary column."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return binary and (pa.types.is_binary(t) or pa.types.is_large_binary(t))


def _one(path: str, schema, found: list[str], what: str, option: str) -> str:
    """The one candidate column, or the one-line error saying which option picks it."""
    if len(found) == 1:
        return found[0]
    why = f"several columns could hold the {what}s ({', '.join(found)})" if found else f"no {what} column found"
    raise CnnCodesError(f"{path}: {why}; columns: {_listing(schema)}; pass {option}=NAME to name it")


def _item(path: str, key: str, row: int, image, label, kind: str, classes: dict[str, int] | None) -> Item:
    """One row as an item; a row without a usable label or image carries its `problem`."""
    try:
        if label is None or (kind != "string" and label == -1):
            raise ValueError("no label")
        index = class_index(label, classes)
        data, ext = _image(path, row, image)
    except ValueError as e:
        return Item(key, problem=str(e))
    return Item(key, data, index, ext)


def _image(path: str, row: int, value) -> tuple[bytes, str]:
    """(bytes, ext) of an image cell: a binary value, or an Image struct's `bytes`, else the file
    its `path` names, opened as datasets' `Image.decode_example` opens it: an absolute path as
    is, a relative one against the working directory."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), _ext(value, None)
    data, ref = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, None)
    if data is None and not ref:
        raise ValueError("no image (the cell has neither bytes nor a path)")
    if data is None:
        if "://" in ref or "::" in ref:
            raise CnnCodesError(f"{path}: row {row}: its image is not embedded, only a remote path ({ref}); "
                                f"embed the bytes: {EMBED}")
        try:
            with open(ref, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            where = ref if os.path.isabs(ref) else f"'{ref}' (relative to the working directory {os.getcwd()})"
            raise CnnCodesError(f"{path}: row {row}: its image is not embedded and {where} does not exist; run from "
                                f"the folder the paths are relative to, or embed the bytes: {EMBED}") from None
        except OSError as e:
            raise ValueError(f"cannot read its image file {ref} ({e.strerror})") from None
    return data, _ext(data, ref)


def _ext(data: bytes, ref: str | None) -> str:
    """The image format from its magic bytes ("jpg" for JPEG), else the path's suffix."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return Path(ref).suffix.lower().lstrip(".") if ref else ""


def _batches(pf, columns: list[str]) -> Iterator:
    """The columns' record batches, row group by row group: a corrupt group raises ShardDamaged
    after every batch of the groups before it (a batch never spans two groups). pyarrow decodes a
    group's column chunk whole: memory ~ one row group (datasets writes them <= 100 MB)."""
    import pyarrow as pa

    for group in range(pf.num_row_groups):
        try:
            yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ShardDamaged(f"corrupt Parquet data in row group {group + 1} of {pf.num_row_groups} "
                               f"({' '.join(str(e).split())})") from None


def _open(path: str):
    """A ParquetFile (its footer read); OSError when it cannot be opened or is not Parquet."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CnnCodesError(INSTALL) from None
    try:
        return pq.ParquetFile(path)
    except (ValueError, pa.ArrowException) as e:
        raise OSError(f"not a readable Parquet file ({' '.join(str(e).split())}); a file cut short has lost "
                      f"its footer: download or write it again") from None


def _string_classes(files: dict[str, list[str]], label: str) -> list[str]:
    """The sorted distinct names of the label column of every file (that column only)."""
    names: set[str] = set()
    for path in (p for paths in files.values() for p in paths):
        try:
            with _open(path) as pf:
                names.update(v for v in pf.read(columns=[label]).column(0).unique().to_pylist() if v is not None)
        except (OSError, ValueError) as e:
            raise CnnCodesError(f"{path}: cannot read its '{label}' column ({e}); string labels make the class list "
                                f"from every file's names: fix or drop this file") from None
    return sorted(names)


def _features(schema) -> dict:
    """The `datasets` features recorded in the schema's `huggingface` metadata ({} when none)."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _listing(schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _folder_files(folder: Path) -> list[str]:
    """The folder's .parquet files, else its data/ subfolder's (the Hub's layout)."""
    for d in (folder, folder / "data"):
        files = sorted(os.path.abspath(p) for p in d.glob("*" + SUFFIX) if p.is_file())
        if files:
            return files
    return []


def _expand(pattern: str) -> list[str]:
    """The files a brace/glob pattern names, in pattern order (each glob sorted)."""
    from braceexpand import braceexpand

    files: dict[str, None] = {}
    for part in braceexpand(pattern):
        hits = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part] * os.path.isfile(part)
        if not hits:
            raise CnnCodesError(f"{pattern}: {part} matches no file")
        files.update((os.path.abspath(h), None) for h in hits)
    return list(files)


def _signed(path: str) -> InputShard:
    st = os.stat(path)
    return InputShard(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, name=Path(path).stem)
