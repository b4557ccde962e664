"""CSV manifests: a dataset as rows of `path,label[,split]` instead of class folders.

`read_manifest` parses and validates a manifest into `Row`s (one clear error naming the
line for a bad one) and assigns splits: the `split` column when there is one, else all
train, or a seeded, stratified train/val split with `val_fraction`. `data.discover` turns
the rows into the same `FolderLayout` a folder gives, so every command that discovers
images reads manifests too.

Paths are kept as written (the cache and predictions show them so); a relative path is
relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CnnCodesError

MANIFEST_SUFFIXES = (".csv",)
MANIFEST_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestOptions:
    """How to read a manifest: column names and, without a split column, the val split to draw."""

    path_col: str = "path"
    label_col: str = "label"
    split_col: str = "split"
    val_fraction: float | None = None  # None: every row without a split column is train
    seed: int = 0  # seed of the val_fraction split

    def __post_init__(self) -> None:
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise CnnCodesError(f"--val-fraction {self.val_fraction}: must be between 0 and 1 (e.g. 0.2)")


@dataclass(frozen=True)
class Row:
    """One manifest row: its line number, path as written, label ('' when unlabelled) and split."""

    line: int
    path: str
    label: str
    split: str


@dataclass
class Manifest:
    """A parsed manifest: rows in file order and what the cache records about it."""

    path: Path
    rows: list[Row]
    record: dict  # JSON-friendly: manifest path, sha256, columns, how splits were made

    @property
    def root(self) -> Path:
        """The folder relative paths are resolved against."""
        return self.path.parent


def is_manifest(path: str | os.PathLike) -> bool:
    """A regular file with a manifest suffix (.csv)."""
    p = Path(path)
    return p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file()


def read_manifest(path: str | os.PathLike, options: ManifestOptions | None = None, *,
                  require_labels: bool = True) -> Manifest:
    """Parse, validate and split a manifest; raises CnnCodesError naming the line of a bad row.

    `require_labels` False (predict) allows a manifest without a label column.
    """
    options = options or ManifestOptions()
    path = Path(path)
    raw = _read_bytes(path)
    text = _decode(path, raw)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    has_label = _check_columns(path, columns, options, require_labels)
    has_split = options.split_col in columns
    if has_split and options.val_fraction is not None:
        raise CnnCodesError(f"{path}: has a '{options.split_col}' column and --val-fraction was given; "
                            f"drop one (the column's splits, or --val-fraction to draw them)")
    rows = _parse_rows(path, reader, options, has_label, has_split)
    if not rows:
        raise CnnCodesError(f"{path}: no rows; add lines like 'images/a.jpg,cat' below the header")
    if options.val_fraction is not None:
        rows = stratified_split(rows, options.val_fraction, options.seed)
    if has_label:
        _check_labels_in_train(path, rows)
    how = "column" if has_split else ("val_fraction" if options.val_fraction is not None else "all train")
    record = {"path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(),
              "path_col": options.path_col, "label_col": options.label_col if has_label else None,
              "splits_from": how, "val_fraction": options.val_fraction,
              "seed": options.seed if options.val_fraction is not None else None}
    return Manifest(path, rows, record)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CnnCodesError(f"{path}: cannot read manifest ({e.strerror}); check its permissions") from None


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate the BOM spreadsheet programs write
    except UnicodeDecodeError as e:
        raise CnnCodesError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the manifest as UTF-8 CSV") from None


def _check_columns(path: Path, columns: list[str], options: ManifestOptions, require_labels: bool) -> bool:
    """True when the label column is there; a missing required column is an error at line 1."""
    have = ", ".join(columns) or "none"
    if options.path_col not in columns:
        raise CnnCodesError(f"{path} line 1: no '{options.path_col}' column (columns: {have}); "
                            f"add it or name the image column with --path-col")
    if options.label_col not in columns and require_labels:
        raise CnnCodesError(f"{path} line 1: no '{options.label_col}' column (columns: {have}); "
                            f"add it or name the class column with --label-col")
    return options.label_col in columns


def _parse_rows(path: Path, reader: csv.DictReader, options: ManifestOptions, has_label: bool,
                has_split: bool) -> list[Row]:
    rows: list[Row] = []
    seen: dict[str, int] = {}  # normalised full path -> line, to catch 'a.jpg' and './a.jpg'
    try:
        for record in reader:
            line = reader.line_num
            where = f"{path} line {line}"
            p = (record.get(options.path_col) or "").strip()
            if not p:
                raise CnnCodesError(f"{where}: empty '{options.path_col}'; give each row an image path")
            label = (record.get(options.label_col) or "").strip() if has_label else ""
            if has_label and not label:
                raise CnnCodesError(f"{where}: empty '{options.label_col}' for {p}; label the row or remove it")
            split = "train"
            if has_split:
                split = (record.get(options.split_col) or "").strip().lower()
                if split not in MANIFEST_SPLITS:
                    raise CnnCodesError(f"{where}: unknown {options.split_col} '{split}' for {p}; "
                                        f"use one of {', '.join(MANIFEST_SPLITS)}")
            key = os.path.normpath(os.path.join(path.parent, p))
            if key in seen:
                raise CnnCodesError(f"{where}: {p} is listed again (first at line {seen[key]}); list each image once")
            seen[key] = line
            rows.append(Row(line, p, label, split))
    except csv.Error as e:
        raise CnnCodesError(f"{path} line {reader.line_num}: not valid CSV ({e}); fix the quoting") from None
    return rows


def stratified_split(rows: list[Row], fraction: float, seed: int) -> list[Row]:
    """Move round(fraction x n) rows of each label to val, chosen by a seeded hash of the path.

    Reproducible and independent of row order; ranking by a per-path hash rather than
    drawing a permutation (sklearn's train_test_split) keeps a split stable when rows are
    appended: only the boundary row of the new row's class can change side, so an
    incremental extract re-extracts at most one old image per appended row. Every label
    keeps at least one train row.
    """
    by_label: dict[str, list[Row]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    val: set[int] = set()
    for members in by_label.values():
        n_val = min(int(fraction * len(members) + 0.5), len(members) - 1)
        ranked = sorted(members, key=lambda r: hashlib.sha256(f"{seed}\0{r.path}".encode()).digest())
        val.update(r.line for r in ranked[:n_val])
    return [Row(r.line, r.path, r.label, "val" if r.line in val else "train") for r in rows]


def _check_labels_in_train(path: Path, rows: list[Row]) -> None:
    """A val/test label with no train row cannot be learnt: refuse it, naming its first line."""
    train = {r.label for r in rows if r.split == "train"}
    if not train:
        return  # a manifest of held-out images only (e.g. for extract of a test set)
    for r in rows:
        if r.split != "train" and r.label not in train:
            raise CnnCodesError(f"{path} line {r.line}: label '{r.label}' ({r.split}) has no train rows; "
                                f"add train images of it or remove its {r.split} rows")
