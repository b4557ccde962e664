"""`cnncodes` command line: a thin layer over the Python API (one module per command group)."""

from __future__ import annotations

import os
import signal
import sys

import click

from ..errors import CnnCodesError, Interrupted, WriteFailed


class Group(click.Group):
    """Turns user errors into one line (exit 2) and Ctrl-C into a resume hint (exit 130)."""

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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnncodes")
def cli() -> None:
    """Transfer learning on image folders with pretrained ResNets.

    Frozen path: `extract` caches CNN codes to HDF5, `fit-head` trains a linear head on them.
    Fine-tune path: `finetune` trains the whole network. `predict` and `export` use either.
    """


def _register() -> None:
    from . import extract_cmd

    extract_cmd.register(cli)
    for name in ("head_cmd", "finetune_cmd", "demo_cmd", "archs_cmd"):
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        module.register(cli)


_register()


def main() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: restore it so Ctrl-C / kill -INT always stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli(prog_name="cnncodes")
