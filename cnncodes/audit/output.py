"""The audit folder: CSV tables and summary.json written into a temporary folder that becomes DIR in one rename
(an existing DIR is refused, a failed audit leaves nothing), and the table rows of each finding."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CnnCodesError

# The files of an audit folder (docs/formats.md, "Audit folder"), one definition for the writer, fit-head and docs.
LABEL_ISSUES, DUPLICATES, LEAKS, OUTLIERS, SUMMARY = ("label_issues.csv", "duplicates.csv", "leaks.csv",
                                                      "outliers.csv", "summary.json")
COLUMNS = {
    LABEL_ISSUES: ("path", "split", "given", "suggested", "score", "suggested_probability"),
    DUPLICATES: ("path_a", "split_a", "path_b", "split_b", "similarity", "kind"),
    LEAKS: ("path", "split", "train_path", "similarity", "kind"),
    OUTLIERS: ("path", "split", "given", "nearest_class", "score", "z"),
}
PICTURES = {  # finding -> (file, title)
    "label_issues": ("label_issues.png", "label issues: given -> suggested (most suspicious first)"),
    "duplicates": ("duplicates.png", "duplicates: pairs side by side (leaks first)"),
    "outliers": ("outliers.png", "outliers: farthest from their nearest neighbours"),
}
AUDIT_FORMAT, AUDIT_VERSION = "cnncodes-audit", 1


def check_new_folder(out: str | os.PathLike) -> Path:
    """Refuse an existing DIR (an audit never writes over anything) before any work is done."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise CnnCodesError(f"{out} exists; audit writes a new folder: name another one (or move {out} away)")
    return out


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` once everything is written; removed on any failure."""
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # made by someone else meanwhile: keep theirs
            raise CnnCodesError(f"{out} appeared while the audit ran; nothing written: rerun with another folder")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should read like any new folder
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_csv(folder: Path, name: str, rows: list[tuple]) -> Path:
    """One table of the audit folder, its header from COLUMNS; floats with 6 significant digits."""
    path = folder / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS[name])
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return path


def write_summary(folder: Path, summary: dict) -> Path:
    path = folder / SUMMARY
    path.write_text(json.dumps({"format": AUDIT_FORMAT, "format_version": AUDIT_VERSION, **summary}, indent=2))
    return path
