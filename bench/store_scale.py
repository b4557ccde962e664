"""The store at scale, three inputs side by side: an image folder, WebDataset tars, Parquet files.

    python bench/store_scale.py                     # the full run: 10^4 and 10^5 images, medians of 3
    python bench/store_scale.py --images 1000,2000 --repeats 1 --torchrun-images 600 --name /tmp/store_scale_small

The same images (`wds_scale.write_dataset`: 72-px JPEGs, 10 classes) as DIR/train/c<k>/<i>.jpg, as
tars of 1,000 samples and as the Hub's DIR/data/train-0000k-of-0000n.parquet (1,000 rows a file,
Image and ClassLabel features in the `huggingface` schema metadata); smaller sizes are prefixes of
the largest. Per input and size, `cnncodes extract DATA -o OUT --weights none --image-size 64 -q`
in a fresh process (`wds_scale.measured`): wall, overhead = 1 - in-memory / command (the same bytes
through the batch step: `wds_scale.in_memory_seconds`), peak RSS, a no-op rerun. On the largest:
kill -9 at half and rerun (finished shards redone: 0); 10 images added to class c3 (folder: adjacent
names mid-class; tars/Parquet: a new 10-sample shard) and rerun. --torchrun (folder, OMP_NUM_THREADS=1):
2 processes, one rank killed at half, a 2-process rerun, compared bitwise with an uninterrupted run.
Results to bench/results/<name>.json (an absolute --name: NAME.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware, results_header, write_results  # noqa: E402
from wds_scale import command, kill_and_resume, measured, memory_in_fresh_process, shard_list, write_dataset  # noqa: E402

INPUTS = ("folder", "webdataset", "parquet")
PER_SHARD = 1000
CLASSES = [f"c{k}" for k in range(10)]


def samples(tars: list[Path]):
    from cnncodes.sources.webdataset import read_samples

    for tar in tars:
        for s in read_samples(str(tar)):
            yield s.key, s.files["jpg"], int(s.files["cls"])


def once(write):
    """`write(folder, ...)` only when `folder` has no completion mark (a half-written one is removed first)."""
    def wrapped(folder: Path, *args) -> Path:
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            write(folder, *args)
            (folder / ".complete").touch()
        return folder
    return wrapped


@once
def write_folder(folder: Path, tars: list[Path]) -> None:
    for key, data, label in samples(tars):
        (folder / "train" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (folder / "train" / CLASSES[label] / f"{key}.jpg").write_bytes(data)


@once
def folder_prefix(folder: Path, master: Path, n: int) -> None:
    """The first `n` images of `master` (hard links: the same files, sizes and mtimes)."""
    for k, c in enumerate(CLASSES):
        (folder / "train" / c).mkdir(parents=True)
        for i in range(k, n, len(CLASSES)):
            os.link(master / "train" / c / f"{i:09d}.jpg", folder / "train" / c / f"{i:09d}.jpg")


def write_rows(path: Path, rows: list[tuple[str, bytes, int]]) -> None:
    """One Parquet file as `datasets` writes an Image + ClassLabel dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": d, "path": f"{k}.jpg"} for k, d, _ in rows], image),
                      "label": pa.array([label for *_, label in rows], pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": CLASSES}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})}), path)


@once
def write_parquet(folder: Path, tars: list[Path]) -> None:
    (folder / "data").mkdir()
    for k, tar in enumerate(tars):
        write_rows(folder / "data" / f"train-{k:05d}-of-{len(tars):05d}.parquet", list(samples([tar])))


def write_tar(path: Path, rows: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label in rows:
            for ext, blob in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


SUMMARY = {"extracted": r"from (\d+) input shards", "done": r"(\d+) shards skipped as done", "redone": r"(\d+) redone",
           "failed": r"(\d+) failed"}


def summary(text: str) -> dict:
    """The numbers of `extract`'s summary line."""
    if "input shards" not in text:
        raise SystemExit(f"no summary line in:\n{text}")
    return {k: int(m.group(1)) if (m := re.search(p, text)) else 0 for k, p in SUMMARY.items()}


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.with_name("codes.shards").glob("*/*.h5")}


def add_ten(name: str, data: Path, out: Path, n: int, root: Path) -> dict:
    """10 new images in class c3 and a rerun: how many shards it extracts (the added files are removed after)."""
    rows = []
    for j in range(10):  # new images, drawn as write_dataset draws them
        buf = io.BytesIO()
        field = np.random.default_rng(1000 + j).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(field).resize((72, 72), Image.BICUBIC).save(buf, "JPEG", quality=90)
        rows.append((f"added-{j:03d}", buf.getvalue(), 3))
    if name == "folder":  # adjacent names in the middle of the class: 000050003_0.jpg .. _9 sort after 000050003.jpg
        middle = n // 2 + 3
        added = [data / "train" / "c3" / f"{middle:09d}_{j}.jpg" for j in range(10)]
        for path, (_, blob, _) in zip(added, rows):
            path.write_bytes(blob)
    elif name == "parquet":  # a new file of 10 rows (a file never gains rows in place)
        added = [data / "data" / "train-added.parquet"]
        write_rows(added[0], rows)
    else:  # a new 10-sample tar at the end of the shard list
        added = [root / "train-added.tar", root / "with-added.txt"]
        write_tar(added[0], rows)
        added[1].write_text(data.read_text() + f"{added[0]}\n")
        data = added[1]
    before = mtimes(out)
    try:
        wall, _, text = measured(data, out, 1)
    finally:
        for path in added:
            path.unlink()
    after = mtimes(out)
    return {**summary(text), "rerun_seconds": round(wall, 2),
            "kept_shards_rewritten": sum(after.get(k, v) != v for k, v in before.items())}


def _read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:  # a process gone meanwhile
        return ""


def worker_pids(pid: int) -> dict[int, int]:
    """torchrun's workers: RANK -> pid (its children whose environment holds a RANK)."""
    found = {}
    for child in (int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in _read(task / "children").split()):
        found.update({int(v[5:]): child for v in _read(f"/proc/{child}/environ").split("\0") if v.startswith("RANK=")})
    return found


def same_store(a: Path, b: Path) -> list[str]:
    """What differs between two stores, bitwise (features, labels, paths, views per split); [] = equal."""
    from cnncodes.store import Cache

    with Cache(a) as x, Cache(b) as y:
        if x.splits != y.splits:
            return [f"splits {x.splits} != {y.splits}"]
        diffs = []
        for s in x.splits:
            fx, fy = x.features(s)[()], y.features(s)[()]
            if fx.dtype != fy.dtype or fx.shape != fy.shape or fx.tobytes() != fy.tobytes():
                diffs.append(f"{s}/features")
            diffs += [f"{s}/{f}" for f in ("labels", "paths", "views") if not np.array_equal(getattr(x, f)(s), getattr(y, f)(s))]
        return diffs


def torchrun_kill(data: Path, root: Path, rank: int) -> dict:
    """2 processes, kill -9 on `rank` once half the output shards exist, a 2-process rerun, compared
    bitwise with an uninterrupted 2-process run (root/torchrun-ref)."""
    ref = root / "torchrun-ref" / "codes.h5"
    total = len(mtimes(ref))
    out = root / f"torchrun-kill{rank}" / "codes.h5"
    shutil.rmtree(out.parent, ignore_errors=True)
    log = out.parent.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.Popen(command(data, out, 2), stdout=fh, stderr=fh, start_new_session=True)
    victim, others, at_kill = None, [], 0
    while proc.poll() is None and victim is None:
        workers = worker_pids(proc.pid)
        if len(workers) == 2 and (at_kill := len(mtimes(out))) >= total // 2:
            victim, others = workers[rank], [p for r, p in workers.items() if r != rank]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    try:
        proc.wait(timeout=120)  # torchrun sees the dead worker and stops the other
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in others:  # each worker has a session of its own: none may outlive torchrun
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    finished = mtimes(out)
    wall, _, text = measured(data, out, 2)
    after = mtimes(out)
    return {"killed_rank": rank, "killed": victim is not None, "shards": total, "present_at_kill": at_kill,
            "finished_after_kill": len(finished), "torchrun_exit": proc.returncode, "torchrun_log": str(log),
            "rerun": summary(text), "rerun_seconds": round(wall, 2), "differs_from_uninterrupted": same_store(out, ref),
            "finished_shards_redone": sum(after.get(k) != v for k, v in finished.items())}


def polite_openmp() -> None:
    """Every child waits in OpenMP as the CLI makes its torch wait (`share_cores_politely`): beside other
    jobs, the in-memory pass with OpenMP's default spin was 5-8x slower than the command here."""
    try:
        from cnncodes.runtime import share_cores_politely
    except ImportError:  # a cnncodes without it: the command spins as well
        return
    share_cores_politely(os.environ)


def noop_only(args, result: dict, sizes: list[int], data: dict, root: Path) -> None:
    """`--noop-only`: a no-op rerun (median of 5) of each store a full run left (store-INPUT-N-0), checked up to date."""
    rows = []
    for n in sizes:
        for name in INPUTS:
            out = root / f"store-{name}-{n}-0" / "codes.h5"
            if not out.exists():
                raise SystemExit(f"{out}: no store; run the full bench first (same --dir and --images)")
            runs = [measured(data[n, name], out, 1) for _ in range(max(5, args.repeats))]
            if any("up to date" not in text for *_, text in runs):
                raise SystemExit(f"{out}: a rerun extracted something; not a no-op")
            noop = statistics.median(w for w, _, _ in runs)
            rows.append([name, n, len(mtimes(out)), round(noop, 2), round(min(w for w, _, _ in runs), 2)])
            print(f"{name}, {n} images: no-op rerun {noop:.2f} s (median of {len(runs)})", flush=True)
    result.update({"sizes": sizes, "table": {"columns": ["input", "images", "output shards", "no-op rerun s (median)",
                                                         "fastest s"], "rows": rows},
                   "notes": ["the whole `cnncodes extract DATA -o OUT --weights none --image-size 64 -q` on a finished "
                             "store, in a fresh process (start-up included): the input listed and signed, the index "
                             "read, nothing extracted; median of >= 5"]})
    path = RESULTS / f"{args.name}_noop.json"
    write_results(result, path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="10000,100000", help=f"sizes, comma-separated (multiples of {PER_SHARD})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-largest", type=int, default=None, help="repeats at the largest size [default: --repeats]")
    ap.add_argument("--data-only", action="store_true", help="write the datasets, measure nothing")
    ap.add_argument("--torchrun", action=argparse.BooleanOptionalAction, default=True,
                    help="the 2-process kill -9 of one rank (folder)")
    ap.add_argument("--torchrun-images", type=int, default=4000)
    ap.add_argument("--kill-ranks", default="0,1", help="ranks killed, one per torchrun run")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the datasets and stores go (kept for reruns)")
    ap.add_argument("--name", default="store_scale", help="results file bench/results/NAME.json")
    ap.add_argument("--noop-only", action="store_true", help="only the no-op reruns, of the stores a full run left in "
                    "--dir (results to NAME_noop.json)")
    args = ap.parse_args()
    sizes = sorted(int(v) for v in args.images.split(","))
    assert all(n % PER_SHARD == 0 for n in sizes), f"--images: multiples of {PER_SHARD}"
    assert args.torchrun_images <= sizes[-1], "--torchrun-images: at most the largest size (a prefix of it)"
    top = sizes[-1]
    result = results_header(Path(args.name).name)
    polite_openmp()
    root = Path(args.dir) / f"cnncodes-store-bench-{top}"
    start = time.perf_counter()
    tars = write_dataset(root / "wds", top, PER_SHARD)
    master = write_folder(root / f"folder-{top}", tars)
    data = {(n, "folder"): folder_prefix(root / f"folder-{n}", master, n) for n in sizes}
    for n in sizes:
        data[n, "webdataset"] = shard_list(root, tars[:n // PER_SHARD])
        data[n, "parquet"] = write_parquet(root / f"parquet-{n}", tars[:n // PER_SHARD])
    print(f"# {hardware()}\n# datasets in {root} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.data_only:
        return
    if args.noop_only:
        return noop_only(args, result, sizes, data, root)

    rows, stores = [], {}
    for n in sizes:
        repeats = args.repeats_largest or args.repeats if n == top else args.repeats
        memory = statistics.median(memory_in_fresh_process(data[n, "webdataset"]) for _ in range(repeats))
        for name in INPUTS:
            runs = []
            for r in range(repeats):
                out = root / f"store-{name}-{n}-{r}" / "codes.h5"
                shutil.rmtree(out.parent, ignore_errors=True)
                runs.append(measured(data[n, name], out, 1))
            wall, rss = statistics.median(w for w, _, _ in runs), max(r for _, r, _ in runs)
            shards = summary(runs[0][2])["extracted"]
            noop = statistics.median(measured(data[n, name], out, 1)[0] for _ in range(max(3, repeats)))
            stores[n, name] = out
            rows.append([name, n, shards, round(memory, 1), round(wall, 1), round(1 - memory / wall, 3), round(rss),
                         round(noop, 2)])
            print(f"{name}, {n} images, {shards} shards: in memory {memory:.1f} s, command {wall:.1f} s, overhead "
                  f"{100 * (1 - memory / wall):.1f}%, peak RSS {rss:.0f} MB, no-op rerun {noop:.2f} s", flush=True)

    kills, adds = {}, {}
    for name in INPUTS:
        out = root / f"kill-{name}" / "codes.h5"
        shutil.rmtree(out.parent, ignore_errors=True)
        kills[name] = kill_and_resume(data[top, name], out, 1, len(mtimes(stores[top, name])))
        adds[name] = add_ten(name, data[top, name], stores[top, name], top, root)
        print(f"{name}: kill -9 at half: {kills[name]}\n{name}: 10 images added: {adds[name]}", flush=True)

    torchrun = None
    if args.torchrun:
        os.environ["OMP_NUM_THREADS"] = "1"  # every torchrun run, the reference too (inherited by the children)
        tdata = folder_prefix(root / f"folder-{args.torchrun_images}", master, args.torchrun_images)
        ref = root / "torchrun-ref" / "codes.h5"
        shutil.rmtree(ref.parent, ignore_errors=True)
        wall, _, text = measured(tdata, ref, 2)
        torchrun = {"images": args.torchrun_images, "uninterrupted": {**summary(text), "seconds": round(wall, 2)},
                    "kills": [torchrun_kill(tdata, root, int(r)) for r in args.kill_ranks.split(",")]}
        print(f"torchrun, 2 processes, {args.torchrun_images} images: {torchrun}", flush=True)

    notes = [f"resnet18 --weights none --image-size 64, 72-px JPEGs, 10 classes, {PER_SHARD} per tar/Parquet file, "
             f"folder shards by --shard-size {PER_SHARD} (cut at each class folder); 1 process; medians of "
             f"{args.repeats} ({args.repeats_largest or args.repeats} at {top}; no-op reruns: of >= 3); overhead = 1 - in-memory / command, the in-memory time being the same images' bytes "
             f"through the batch step (one figure per size for the three inputs; GOMP_SPINCOUNT="
             f"{os.environ.get('GOMP_SPINCOUNT', 'unset')} in both); peak RSS: the largest of the repeats"]
    for name in INPUTS:
        k, a = kills[name], adds[name]
        notes.append(f"{name}, {top} images: kill -9 at half ({k['finished_at_kill']} of {k['shards']} shards "
                     f"finished): the rerun skipped {k['rerun_skipped_as_done']}, extracted {k['rerun_extracted_shards']}, "
                     f"redid {k['finished_shards_redone']} finished shards; 10 images added: the rerun extracted "
                     f"{a['extracted']} shards ({a['redone']} redone) in {a['rerun_seconds']} s")
    for k in (torchrun or {}).get("kills", []):
        notes.append(f"torchrun, 2 processes, {torchrun['images']} images (folder, OMP_NUM_THREADS=1): rank "
                     f"{k['killed_rank']} killed with {k['present_at_kill']} of {k['shards']} shards written; the "
                     f"2-process rerun redid {k['finished_shards_redone']} finished shards; the store "
                     + ("equals the uninterrupted run's, bitwise" if not k["differs_from_uninterrupted"]
                        else f"differs from the uninterrupted run's in {', '.join(k['differs_from_uninterrupted'])}"))
    result.update({
        "arch": "resnet18", "image_size": 64, "weights": "none", "repeats": args.repeats,
        "repeats_largest": args.repeats_largest or args.repeats, "per_shard": PER_SHARD,
        "sizes": sizes, "kill": kills, "add_ten": adds, "torchrun": torchrun,
        "table": {"columns": ["input", "images", "shards", "in-memory s", "command s", "bookkeeping overhead",
                              "peak RSS MB", "no-op rerun s"], "rows": rows},
        "notes": notes})
    path = RESULTS / f"{args.name}.json"  # an absolute NAME replaces RESULTS
    write_results(result, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
