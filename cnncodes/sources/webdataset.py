"""WebDataset shards as input (torch-free): patterns -> input shards per split, tar -> samples.

A WebDataset shard is a plain tar file; one sample = the members sharing a key (`k.jpg` + `k.cls`
or `k.json`), as img2dataset, LAION and DataComp write them. Shards are read with the standard
library's `tarfile` in streaming mode (`r|*`: sequential, never indexed, gzip too), not with the
`webdataset` package: we need per-shard control over every fault (truncation, duplicate keys,
samples without an image or label) and no torch DataLoader pipeline around it. We follow its
conventions: brace ranges (`train-{000000..000099}.tar`), the key/extension split of member names,
`.cls` integer labels, and shard lists in a text file. Local paths only (no URLs or `pipe:`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from ..errors import CnnCodesError
from ..folders import IMAGE_EXTENSIONS
from .base import InputShard, Item, LabelNames, ShardDamaged, class_index

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".shards")  # a text file with one shard path per line
SPEC_SUFFIX = ".json"  # {"train": PATTERN, "val": PATTERN} (a pattern may be a list of patterns)
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # jpg, jpeg, png, ...
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: a/b.c.jpg -> (a/b, c.jpg)
_TAR_END = 1024  # two zero blocks end a tar archive


@dataclass(frozen=True)
class WebDatasetSource:
    """WebDataset input: a pattern per split, where labels come from and the class names.

    `label_key` "cls": the integer in `k.cls`; any other name: that field of `k.json` (an integer
    class index, or a class name found in `classes`). `classes_file`: one class name per line
    (index = line number); without it the classes are "0".."max label seen".
    """

    patterns: dict[str, tuple[str, ...]]
    label_key: str = "cls"
    classes_file: str | None = None
    base: str = "."  # relative patterns are relative to this folder (a spec or list file's folder)

    def identity(self) -> dict:
        """What, beside the images, decides the rows: recorded in every output shard and the index."""
        return {"label_key": self.label_key, "classes": self.classes()}

    def items(self, shard: InputShard) -> Iterator[Item]:
        """The shard's samples as items, read sequentially (see `read_samples`); row keys are
        `<shard file name>/<sample key>`."""
        names = self.classes()
        classes = None if names is None else {c: i for i, c in enumerate(names)}
        for sample in read_samples(shard.path):
            key = f"{Path(shard.path).name}/{sample.key}"
            try:
                if sample.problem:
                    raise ValueError(sample.problem)
                ext, data = sample_image(sample)
                yield Item(key, data, sample_label(sample, self.label_key, classes), ext)
            except LabelNames as e:
                raise CnnCodesError(f"{shard.path}: sample {sample.key}: {e}") from None
            except ValueError as e:
                yield Item(key, problem=str(e))

    def classes(self) -> list[str] | None:
        if self.classes_file is None:
            return None
        try:
            names = [line.strip() for line in Path(self.classes_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise CnnCodesError(f"{self.classes_file}: cannot read the class list ({e.strerror}); "
                                f"pass --classes FILE with one class name per line") from None
        if not names or len(set(names)) != len(names):
            raise CnnCodesError(f"{self.classes_file}: the class list is empty or names a class twice; "
                                f"write one distinct class name per line")
        return names

    def shards(self) -> dict[str, list[InputShard]]:
        """Each split's input shards, in pattern order, each signed by a stat (never opened)."""
        out = {}
        for split, patterns in self.patterns.items():
            paths = [p for pattern in patterns for p in expand(pattern, Path(self.base))]
            _refuse_repeats(split, paths)
            out[split] = [_signed(p) for p in paths]
        return out


def is_shard_input(data: str | os.PathLike) -> bool:
    """True when DATA names WebDataset shards (a tar pattern, a shard list or a JSON spec)."""
    text = str(data).lower()
    return text.endswith(SHARD_SUFFIXES + LIST_SUFFIXES + (SPEC_SUFFIX,))


def source_from_cli(data: str, val: str | None, test: str | None, label_key: str,
                    classes_file: str | None) -> WebDatasetSource | None:
    """The CLI's DATA/--val/--test/--label-key/--classes as a ShardSource; None for a folder or CSV."""
    if not is_shard_input(data):
        if val or test:
            raise CnnCodesError(f"--val/--test take WebDataset shard patterns, for a DATA that is one too "
                                f"({data} is a folder or CSV: put its splits in {data}/train, {data}/val)")
        return None
    patterns: dict[str, tuple[str, ...]] = {}
    base = "."
    if str(data).lower().endswith(SPEC_SUFFIX):
        patterns, base = read_spec(Path(data)), str(Path(data).parent)
    else:
        patterns["train"] = (str(data),)
    for split, pattern in (("val", val), ("test", test)):
        if pattern:
            patterns[split] = (str(Path(pattern).absolute()) if base != "." else pattern,)
    return WebDatasetSource(patterns, label_key, classes_file, base)


def read_spec(path: Path) -> dict[str, tuple[str, ...]]:
    """A JSON spec {"train": PATTERN, "val": [PATTERN, ...]}: patterns relative to its folder."""
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise CnnCodesError(f"{path}: no such shard spec; write a JSON object like "
                            f'{{"train": "train-{{000000..000099}}.tar", "val": "val-000000.tar"}}') from None
    except (OSError, ValueError) as e:
        raise CnnCodesError(f"{path}: not a readable JSON shard spec ({e}); write a JSON object like "
                            f'{{"train": "train-{{000000..000099}}.tar"}}') from None
    if not isinstance(spec, dict) or not spec or not all(
            isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)) for v in spec.values()):
        raise CnnCodesError(f"{path}: a shard spec maps split names to a pattern or a list of patterns, "
                            f'e.g. {{"train": "train-{{000000..000099}}.tar", "val": ["val-a.tar", "val-b.tar"]}}')
    return {str(k): (v,) if isinstance(v, str) else tuple(v) for k, v in spec.items()}


def expand(pattern: str, base: Path) -> list[str]:
    """The shard paths a pattern names: a list file's lines, brace ranges, then globs (each sorted).

    Raises CnnCodesError naming the pattern when it matches nothing.
    """
    if pattern.lower().endswith(LIST_SUFFIXES):
        listing = _resolve(pattern, base)
        try:
            lines = [ln.strip() for ln in Path(listing).read_text().splitlines()]
        except OSError as e:
            raise CnnCodesError(f"{listing}: cannot read the shard list ({e.strerror}); write one shard path per line") from None
        found = [p for ln in lines if ln and not ln.startswith("#") for p in expand(ln, Path(listing).parent)]
        if not found:
            raise CnnCodesError(f"{listing}: the shard list names no shard; write one .tar path per line")
        return found
    found = []
    for one in braceexpand(pattern):
        path = _resolve(one, base)
        if glob.has_magic(path):
            found += sorted(glob.glob(path))
        elif os.path.exists(path):
            found.append(path)
        else:
            raise CnnCodesError(f"{path}: no such shard (from pattern {pattern}); check the path and the brace range")
    if not found:
        raise CnnCodesError(f"{pattern}: this pattern matches no file; check the path, the brace range "
                            f"(e.g. train-{{000000..000099}}.tar) or the glob")
    return found


def _resolve(path: str, base: Path) -> str:
    return os.path.abspath(path if os.path.isabs(path) else base / path)


def _signed(path: str) -> InputShard:
    try:
        st = os.stat(path)
    except OSError as e:
        raise CnnCodesError(f"{path}: cannot read this shard ({e.strerror}); fix it or drop it from the pattern") from None
    return InputShard(path, st.st_size, st.st_mtime_ns, output_stem(path))


def _refuse_repeats(split: str, paths: list[str]) -> None:
    """Output shards are named after input shards: two inputs of one split must not share a name."""
    seen: dict[str, str] = {}
    for p in paths:
        stem = output_stem(p)
        if stem in seen:
            what = "is listed twice" if seen[stem] == p else f"has the same name as {seen[stem]}"
            raise CnnCodesError(f"{p}: this {split} shard {what}; list each shard once, with distinct file names")
        seen[stem] = p


def output_stem(path: str) -> str:
    """The input shard's file name without its tar suffix (train-000001.tar -> train-000001)."""
    name = Path(path).name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- reading one shard


@dataclass
class Sample:
    """The members of one key: extension -> bytes; `problem` set when it must be skipped."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def read_samples(path: str) -> Iterator[Sample]:
    """The samples of a tar, in order, read sequentially (one member in memory at a time).

    Raises OSError when the file cannot be opened, ShardDamaged when it is truncated or corrupt
    (after yielding every sample before the damage). A key seen before in this shard is yielded
    with its `problem` set (the first occurrence is kept).
    """
    seen: set[str] = set()
    current: Sample | None = None
    with open(path, "rb") as fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r|*")
            for member in tar:
                if not member.isfile():
                    continue
                parts = _KEY_EXT.match(member.name)
                if parts is None:
                    continue  # no extension: not part of a sample (webdataset skips these too)
                key, ext = parts.group(1), parts.group(2).lower()
                data = tar.extractfile(member).read()
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key)
                    if key in seen:
                        current.problem = "duplicate key: this key appeared earlier in the shard; the first kept"
                    seen.add(key)
                if ext in current.files and current.problem is None:
                    current.problem = f"duplicate key: two {key}.{ext} members"
                current.files.setdefault(ext, data)
            end = tar.offset
            compressed = tar.fileobj is not fh and getattr(tar.fileobj, "comptype", "tar") != "tar"
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise
            if current is not None:
                current.problem = "may be cut short by the damage that ends the shard"
                yield current
            raise ShardDamaged(f"truncated or corrupt tar ({str(e) or type(e).__name__})") from None
        if not compressed and not _ends_cleanly(fh, end):
            if current is not None:
                current.problem = "may be cut short by the damage that ends the shard"
                yield current
            raise ShardDamaged("truncated tar (no end-of-archive marker after the last member)")
    if current is not None:
        yield current


def _ends_cleanly(fh, end: int) -> bool:
    """An uncompressed tar cut at a member boundary reads as complete: its end marker tells."""
    fh.seek(end)
    tail = fh.read(_TAR_END)
    return len(tail) == _TAR_END and not any(tail)


def sample_image(sample: Sample) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image; ValueError with the reason when it has none."""
    for ext in IMAGE_KEYS:
        if ext in sample.files:
            return ext, sample.files[ext]
    raise ValueError(f"no image ({'/'.join(IMAGE_KEYS[:4])}...) in the sample; it has {', '.join(sorted(sample.files)) or 'nothing'}")


def sample_label(sample: Sample, label_key: str, classes: dict[str, int] | None) -> int:
    """The sample's class index; ValueError with the reason when missing or outside the class list
    (`classes`: class name -> index, from `ShardSource.classes`; None: labels are indices)."""
    if label_key == "cls":
        if "cls" not in sample.files:
            raise ValueError("no label (no .cls member)")
        text = sample.files["cls"].decode("utf-8", "replace").strip()
        try:
            value: int | str = int(text)
        except ValueError:
            raise ValueError(f"the .cls label '{text[:40]}' is not an integer") from None
    else:
        if "json" not in sample.files:
            raise ValueError(f"no label (no .json member with a '{label_key}' field)")
        try:
            meta = json.loads(sample.files["json"])
        except ValueError:
            raise ValueError("the .json member is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get(label_key) is None:
            raise ValueError(f"no label (the .json has no '{label_key}' field)")
        value = meta[label_key]
    return class_index(value, classes)
