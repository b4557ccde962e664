"""Image folders and CSV manifests: split/class discovery (plain os calls, importable without torch).

`discover()` turns DATA/<class>/<image> or DATA/{train,val,test}/<class>/<image> into a
`FolderLayout`: one list of `ImageFile` per split. Kept apart from `data` (decoding,
presets, loaders) so the torch-free no-op check of `extract` can rescan a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CnnCodesError
from .manifest import MANIFEST_SUFFIXES, Manifest, ManifestOptions, is_manifest, read_manifest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
JPEG_SUFFIXES = (".jpg", ".jpeg")  # the files the JPEG draft decode (reduced DCT scale) applies to
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


@dataclass(frozen=True)
class ImageFile:
    """One candidate image: its path relative to the data root, label and file signature."""

    path: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class FolderLayout:
    """What `discover` found: splits of labelled files sharing one class list."""

    root: Path
    classes: list[str]
    splits: dict[str, list[ImageFile]]
    ignored: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> (path, reason)
    warnings: list[str] = field(default_factory=list)
    manifest: dict | None = None  # for a CSV manifest: what the cache records about it (Manifest.record)


def discover(root: str | os.PathLike, manifest: ManifestOptions | None = None) -> FolderLayout:
    """Find splits and classes under `root`, or in the CSV manifest `root`.

    `root/{train,val,test}/<class>/<image>` gives one split per folder, sharing one
    class list; `root/<class>/<image>` gives a single split called "train". Files with
    other extensions inside class folders are listed in `ignored` with the reason.
    A .csv file is read as a manifest with `manifest` options (see `cnncodes.manifest`):
    the layout's root is its folder and each file's path is the row's path as written.
    """
    root = Path(root)
    if is_manifest(root):
        return manifest_layout(read_manifest(root, manifest))
    if manifest is not None and manifest.val_fraction is not None:
        raise CnnCodesError(f"{root}: --val-fraction applies to CSV manifests; for a folder, "
                            f"put the val images in {root}/val/<class>/")
    if not root.exists():
        what = "CSV manifest" if root.suffix.lower() in MANIFEST_SUFFIXES else "folder"
        raise CnnCodesError(f"{root}: no such {what}; pass the root of an image folder (DATA/<class>/<image>) "
                            f"or a CSV manifest (.csv)")
    if not root.is_dir():
        raise CnnCodesError(f"{root}: not a folder; pass the root of an image folder (DATA/<class>/<image>) "
                            f"or a CSV manifest (.csv with path,label columns)")
    split_dirs = {d.name: d for d in _subdirs(root) if d.name.lower() in SPLIT_NAMES}
    if not split_dirs:
        split_dirs = {"train": root}
    layout = FolderLayout(root=root, classes=[], splits={})
    found: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
    for split, split_dir in split_dirs.items():
        found[split], layout.ignored[split] = _scan_split(root, split_dir)
    class_set = sorted({c for per_class in found.values() for c, files in per_class.items() if files})
    if not class_set:
        raise CnnCodesError(
            f"{root}: no images found; expected {root}/<class>/<image> or {root}/train/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    layout.classes = class_set
    index = {c: i for i, c in enumerate(class_set)}
    for split, per_class in found.items():
        files = [
            ImageFile(path, index[c], size, mtime)
            for c in class_set
            for path, size, mtime in per_class.get(c, [])
        ]
        layout.splits[split] = files
        for c, entries in per_class.items():
            if not entries:
                layout.warnings.append(f"{split}/{c}: empty class folder, ignored")
    layout.warnings += _class_coverage_warnings(layout, found)
    return layout


def manifest_layout(m: Manifest) -> FolderLayout:
    """A manifest's rows as a layout: classes are the sorted labels (as ImageFolder gives),
    rows keep the manifest's order, and a row whose file is missing is listed in `ignored`
    (skipped and reported like an unreadable image; fatal under --strict)."""
    classes = sorted({r.label for r in m.rows})
    index = {c: i for i, c in enumerate(classes)}
    layout = FolderLayout(root=m.root, classes=classes, splits={}, manifest=m.record)
    for r in m.rows:
        files = layout.splits.setdefault(r.split, [])
        ignored = layout.ignored.setdefault(r.split, [])
        try:
            st = (m.root / r.path).stat()
        except OSError as e:
            ignored.append((r.path, f"{e.strerror or 'cannot read file'} ({m.path.name} line {r.line})"))
            continue
        files.append(ImageFile(r.path, index[r.label], st.st_size, st.st_mtime_ns))
    return layout


def _class_coverage_warnings(layout: FolderLayout, found: dict) -> list[str]:
    if "train" not in found or len(found) == 1:
        return []
    train_classes = {c for c, files in found["train"].items() if files}
    notes = []
    for split, per_class in found.items():
        missing = sorted(c for c, files in per_class.items() if files and c not in train_classes)
        if split != "train" and missing:
            notes.append(
                f"{split}: class(es) {', '.join(missing)} have no training images in "
                f"{layout.root / 'train'}; a head cannot learn them: add training images or remove them from {split}"
            )
    return notes


def _subdirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CnnCodesError(f"{folder}: cannot list folder ({e.strerror}); check its permissions") from e
    return [Path(e.path) for e in entries if not e.name.startswith(".") and _is_dir(e)]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _scan_split(root: Path, split_dir: Path):
    per_class: dict[str, list[tuple[str, int, int]]] = {}
    ignored: list[tuple[str, str]] = []
    for class_dir in _subdirs(split_dir):
        if split_dir == root and class_dir.name.lower() in SPLIT_NAMES:
            continue
        entries = per_class.setdefault(class_dir.name, [])
        for path, rel in _image_entries(class_dir, ignored, root):
            try:
                st = os.stat(path)
            except OSError as e:
                ignored.append((rel, f"cannot read file ({e.strerror})"))
                continue
            entries.append((rel, st.st_size, st.st_mtime_ns))
    return per_class, ignored


def image_files(folder: Path, ignored: list, root: Path) -> list[Path]:
    """The image files below `folder`, sorted (symlinks followed once, loops cut); other files and
    unreadable folders are added to `ignored` as (path relative to `root`, reason)."""
    return [Path(path) for path, _ in _image_entries(folder, ignored, root)]


def _image_entries(folder: Path, ignored: list, root: Path) -> list[tuple[str, str]]:
    """`image_files` as (path, path relative to `root` in posix form) strings: a folder of 10^5 images
    is listed on every no-op rerun, where a Path per file (parse, relative_to) cost more than the stat."""
    out = []
    for path, rel in _walk_files(folder, ignored, root):
        suffix = os.path.splitext(rel)[1]
        if suffix.lower() in IMAGE_EXTENSIONS:
            out.append((path, rel))
        else:
            ignored.append((rel, f"not an image (unsupported extension '{Path(rel).suffix or '(none)'}')"))
    return out


def _walk_files(folder: Path, ignored: list, root: Path) -> list[tuple[str, str]]:
    """All files below `folder` as (path, path relative to `root`), sorted as paths sort (by their parts),
    following symlinks once (loops are cut)."""
    seen: set[tuple[int, int]] = set()
    out: list[tuple[str, str]] = []
    top = folder.relative_to(root).as_posix()
    stack = [(str(folder), "" if top == "." else top)]
    while stack:
        d, d_rel = stack.pop()
        shown = d_rel or "."
        try:
            st = os.stat(d)
        except OSError as e:
            ignored.append((shown, f"cannot read folder ({e.strerror})"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            ignored.append((shown, "symlink loop, not followed"))
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            ignored.append((shown, f"cannot list folder ({e.strerror})"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{d_rel}/{e.name}" if d_rel else e.name
            if _is_dir(e):
                subdirs.append((e.path, rel))
            elif e.is_symlink() and not os.path.exists(e.path):
                ignored.append((rel, "broken symlink or symlink loop"))
            else:
                out.append((e.path, rel))
        stack.extend(reversed(subdirs))
    return sorted(out, key=lambda pr: pr[1].split("/"))
