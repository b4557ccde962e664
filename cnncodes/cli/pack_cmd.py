"""`cnncodes pack`: a sharded store (index + output shards) copied into one ordinary cache file."""

from __future__ import annotations

import click


@click.command("pack")
@click.argument("index", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The cache file to write (.h5).")
def pack_command(index, out):
    """Copy the sharded store INDEX (the codes.h5 of a WebDataset extract) into one ordinary cache
    file OUT, readable without the shards folder. Written atomically; INDEX is left as it is."""
    from ..runtime import check_replaceable
    from ..store.pack import pack

    check_replaceable(out, "cache", _is_cache, inputs=[index])
    rows = pack(index, out)
    click.echo(f"packed {rows} rows of {index} into {out}")


def _is_cache(path) -> bool:
    from ..errors import CnnCodesError
    from ..store import Cache

    try:
        Cache(path).close()
        return True
    except CnnCodesError:
        return False
