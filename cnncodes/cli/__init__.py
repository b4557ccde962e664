"""`cnncodes` command line: a thin layer over the Python API (one module per command group)."""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import threading

import click

from ..errors import CnnCodesError, Interrupted, WriteFailed
from ..runtime import share_cores_politely

share_cores_politely()  # before any command imports torch: its OpenMP reads the wait policy once, when loaded


# command name -> (module in this package, click command in it). Modules are imported on
# demand (click's "lazily loading subcommands"): `--help`, `--version` and argument errors
# never import torch, and a broken command module fails loudly when its command is used.
COMMANDS = {
    "extract": ("extract_cmd", "extract_command"),
    "info": ("extract_cmd", "info_command"),
    "fit-head": ("head_cmd", "fit_head_command"),
    "predict": ("head_cmd", "predict_command"),
    "export": ("head_cmd", "export_command"),
    "select": ("select_cmd", "select_command"),
    "finetune": ("finetune_cmd", "finetune_command"),
    "demo": ("demo_cmd", "demo_command"),
    "archs": ("archs_cmd", "archs_command"),
    "pack": ("pack_cmd", "pack_command"),
    "audit": ("audit_cmd", "audit_command"),
}


class Group(click.Group):
    """Lazy subcommands; user errors become one line (exit 2) and Ctrl-C a resume hint (exit 130)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module_name, attr = COMMANDS[name]
            module = importlib.import_module(f"{__name__}.{module_name}")
            self.add_command(getattr(module, attr), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Interrupted as e:
            click.echo(f"\ninterrupted: {e}", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; rerun the same command to continue", err=True)
            sys.exit(130)
        except WriteFailed as e:
            click.echo(f"error: {e}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)  # skip interpreter teardown: HDF5 can crash freeing objects of a failed write
        except CnnCodesError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # a path that cannot be read or written (permissions, read-only, not a folder)
            if isinstance(e, BrokenPipeError) and _stdout_closed():
                sys.exit(_quiet_stdout())  # `cnncodes info | head -1`: the reader has what it wanted
            click.echo(f"error: {_os_error_line(e)}", err=True)
            sys.exit(2)


SIGPIPE_EXIT = 128 + signal.SIGPIPE  # what a shell reports for a command killed by SIGPIPE, as `cat` and `grep` are


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader is gone (a BrokenPipeError from elsewhere, a worker's
    pipe or a socket, stays an error)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no fileno (a test runner's stream), no poll
        return False


def _quiet_stdout() -> int:
    """Point stdout at /dev/null so that no later flush (the exit's) fails again, and return the exit
    status of a command stopped by SIGPIPE (Python's "Note on SIGPIPE", in the signal module's docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_EXIT


def _os_error_line(e: OSError) -> str:
    """One line naming the file and the fix; finished work was written atomically, so it is intact."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"{where}{what}; check that the path exists, is not inside a file, and that you may write there"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnncodes")
def cli() -> None:
    """Transfer learning on image folders with pretrained torchvision and timm networks.

    Frozen path: `extract` caches CNN codes to HDF5, `fit-head` trains a linear head on them.
    Fine-tune path: `finetune` trains the whole network. `predict` and `export` use either.
    """


def main() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: restore it so Ctrl-C / kill -INT always stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli(prog_name="cnncodes")
    except SystemExit as e:
        _exit(e.code)
    _exit(0)


def _exit(code) -> None:
    """Exit with `code`; once torch is imported, without the interpreter's teardown.

    Tearing down torch's modules and the CUDA libraries it loads takes ~1 s of a command's wall
    time on a 2-core CPU (measured: `import torch` alone leaves 0.6 s of teardown), for nothing
    a finished command needs. What a normal exit does first is done here too: non-daemon
    threads are joined, atexit handlers run (h5py closes files, temporary folders go), and the
    output streams are flushed; every file cnncodes writes is already closed and renamed.
    """
    try:
        sys.stdout.flush()  # output still buffered (print, not click.echo) meets a closed pipe here
    except BrokenPipeError:
        code = _quiet_stdout()
    if "torch" not in sys.modules:
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    _join_threads()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _join_threads() -> None:
    """Join the non-daemon threads that run, as the interpreter's exit does. A thread Ctrl-C caught inside
    its `start()` (a decode pool growing) is listed by `threading.enumerate` before it runs, and joining it
    raised "cannot join thread before it is started" over the exit code 130 (seen in CI): it has no work
    yet and is left to `os._exit`."""
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon and t.is_alive():
            t.join()

