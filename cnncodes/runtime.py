"""Device, precision, locking and atomic files: the plumbing every command shares."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import fcntl
import functools
import os
import queue
import resource
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .errors import CnnCodesError, WriteFailed
from .precision import PRECISIONS, autocast, check_precision, tf32  # noqa: F401  (re-exported: callers import them from here)

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions that use it: store (atomic files) and the
# torch-free no-op check of `extract` import this module without paying for torch.

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when available; an explicit 'cuda' without a GPU is a clear error."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CnnCodesError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnCodesError("--device cuda asked for but no CUDA GPU is available; use --device cpu")
    return device


def inference_batch_size(device: torch.device) -> int:
    """Default images per forward pass without gradients.

    On CPU small batches run fastest: their activations stay in the per-core L2 cache
    (measured on 2 Zen cores: resnet50 bf16 92 img/s at batch 8, 83 at 16, 56 at 64).
    On CUDA larger batches keep the GPU busy.
    """
    return 128 if device.type == "cuda" else 16


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights files run to gigabytes).

    Remembered per (path, size, mtime) for the process: a command asks for the same weights
    file's hash more than once (the no-op check, then resolving the weights; select checks every
    backbone before extracting it), and reading 100 MB twice is start-up time for nothing."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def available_cores() -> int:
    """Cores this process may run on (affinity aware, so it honours taskset and cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def process_cores() -> int:
    """This process's share of the machine's cores: under torchrun its processes split them."""
    from .distributed import local_world_size  # lazy: distributed imports torch

    return max(1, available_cores() // local_world_size())


OPENMP_SPINCOUNT = "10000"
"""Spins an idle OpenMP thread of torch waits before it sleeps (see `share_cores_politely`)."""

_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def share_cores_politely(environ: dict | None = None) -> bool:
    """Make torch's idle OpenMP threads sleep soon instead of spinning; call before the first
    `import torch` (the CLI does, at its top): OpenMP reads these variables once, when loaded.
    Whether it set anything (not when torch is already loaded, nor when the user set a wait policy).

    torch's Linux wheels use GNU OpenMP (libgomp). A thread that finishes its share of a parallel
    region, or waits for the next one, spins GOMP_SPINCOUNT times before it sleeps: 300,000 when
    unset, milliseconds on recent CPUs (`pause` is slow on Sapphire Rapids). On a quiet machine that
    spinning only takes cores from the decode threads between forward passes; beside other jobs a
    thread spins at each barrier for a partner that the scheduler has preempted, so the spinning
    burns the time slices the partner needs (bench/neighbour.py: docs/scale.md, "Beside other jobs").
    A short spin keeps the quiet speed (consecutive operators follow within microseconds) and lets
    the threads sleep, giving their cores away, whenever another process wants them.
    """
    env = os.environ if environ is None else environ
    if "torch" in sys.modules and environ is None:
        return False  # too late for this process: its OpenMP runtime has read its settings
    if any(v in env for v in _WAIT_VARS):
        return False  # the user's choice
    env["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
    return True


def configure_threads(device: torch.device) -> None:
    """Intra-op threads = this process's share of the cores (cgroups/affinity aware).

    Under torchrun the processes of one machine split its cores between them.
    """
    if device.type == "cpu":
        import torch

        torch.set_num_threads(process_cores())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or error leaves the old file untouched and removes the temporary one.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as e:
        raise CnnCodesError(f"{path}: cannot write here ({e.strerror}); check the folder exists and is writable") from e
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should read like any new file
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # h5py/torch report a full disk as either
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "too large" in str(e) or "space" in str(e)
            hint = "no space left (or file size limit)" if full else str(e).splitlines()[0]
            _quiet_h5py_teardown()
            raise WriteFailed(f"{path}: write failed: {hint}; free disk space and rerun; the previous {path.name}, if any, is intact") from e
        raise


def check_replaceable(path: str | os.PathLike, kind: str, is_kind: Callable[[Path], bool],
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse to write a `kind` over one of this command's `inputs`, or over an existing file that
    is not a `kind` (`is_kind` says): finished work of another kind (a cache, a head, a manifest)
    is never replaced by mistake. An existing `kind` is replaced, as a rerun expects."""
    path = Path(path)
    if any(Path(i).exists() and path.exists() and os.path.samefile(path, i) for i in inputs):
        raise CnnCodesError(f"{path}: this is an input of the command; write the {kind} to another file")
    if path.is_dir():
        raise CnnCodesError(f"{path}: a folder; name the {kind} file to write")
    if path.exists() and not is_kind(path):
        raise CnnCodesError(f"{path} exists and is not a {kind}; write to another file, or move it away first")


def figure_format(path: str | os.PathLike) -> str:
    """The image format a figure path names by its suffix ('png' when it has none), checked
    against what matplotlib can write, so a bad suffix fails before any work, in one line."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise CnnCodesError(f"{path}: matplotlib cannot write .{fmt} images; "
                            f"name the file with one of {', '.join('.' + k for k in sorted(known))}")
    return fmt


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib Figure atomically, in the format its suffix names (see `figure_format`)."""
    path = Path(path)
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def _quiet_h5py_teardown() -> None:
    """After a failed write HDF5 objects complain as they are freed; the error is already reported."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if "h5py" not in repr(unraisable.object):
            default(unraisable)

    sys.unraisablehook = hook


def check_space(path: str | os.PathLike, needed: int, keep_note: str = "") -> None:
    """Refuse before writing `needed` bytes beside `path` if the disk or the file size limit is short.

    Failing here is cleaner than failing mid-write (HDF5 does not recover well from that).
    """
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = free if soft == resource.RLIM_INFINITY else min(free, soft)
    if needed > limit:
        what = "free on disk" if limit == free else "allowed by the file size limit (ulimit -f)"
        raise WriteFailed(f"{path}: write failed: no space left: needs about {needed / 1e6:.1f} MB, "
                          f"{limit / 1e6:.1f} MB {what}; free disk space and rerun{keep_note}; "
                          f"the previous {Path(path).name}, if any, is intact")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save through `atomic_path`: readers see the old file or the new one, never half."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class FileLock:
    """An exclusive lock on `<path>.lock` that dies with the process that took it.

    A POSIX record lock (`fcntl.lockf`), not `flock`: forked children (DataLoader workers)
    do not inherit it, so after a kill -9 no orphaned worker keeps the cache or run folder
    locked; the kernel drops it when its owner dies. Record locks never conflict within one
    process, so this process's own held locks are tracked in `_HELD`.
    """

    _HELD: set[str] = set()

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(str(path) + ".lock")
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in FileLock._HELD:
            raise CnnCodesError(f"{self.what} is in use by another cnncodes run in this process; wait for it to finish, or write to another output")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _live_pid(os.pread(fd, 64, 0))
            os.close(fd)  # closing any fd of the file drops our record locks on it: we hold none
            raise CnnCodesError(
                f"{self.what} is in use by another cnncodes process{f' (pid {holder})' if holder else ''}; "
                f"wait for it to finish, or write to another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd, self._key = fd, key
        FileLock._HELD.add(key)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            FileLock._HELD.discard(self._key)
            self._fd = None


def _live_pid(recorded: bytes) -> int | None:
    """The pid written in a lock file if that process is alive (a holder that has only just
    taken the lock may not have written its own pid yet: never name a dead one)."""
    try:
        pid = int(recorded.decode().strip())
        if pid <= 0:
            return None
        os.kill(pid, 0)
    except (ValueError, UnicodeDecodeError, ProcessLookupError):
        return None
    except PermissionError:  # alive, owned by another user
        pass
    return pid


# --------------------------------------------------------------------------- threaded stages

_DONE = object()  # end of a stage's stream
_POLL = 0.05  # seconds between checks of the stop flag while a queue is full or empty


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` unless `stop` is set first; whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            pass
    return False


def pump(source: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """A stage's thread: every item of `source` onto `out`, then the end mark; an exception
    raised by the stage (or one before it) is handed on instead and raised by the caller."""
    try:
        for item in source:
            if not _put(out, item, stop):
                return
        _put(out, _DONE, stop)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        _put(out, e, stop)


def drain(q: queue.Queue, stop: threading.Event) -> Iterator:
    """The items a stage put on `q`, until its end mark; raises what it handed on."""
    while not stop.is_set():
        try:
            item = q.get(timeout=_POLL)
        except queue.Empty:
            continue
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def prefetch(items: Iterator, depth: int) -> Iterator:
    """`items`, produced up to `depth` ahead by a thread; its exceptions are raised here, in order."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    thread = threading.Thread(target=pump, args=(items, out, stop), name="prefetch", daemon=True)
    thread.start()
    try:
        yield from drain(out, stop)
    finally:
        stop.set()
        thread.join()
