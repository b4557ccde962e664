"""`cnncodes extract` and `cnncodes info`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import CnnCodesError
from ..extract.config import DECODES, ExtractConfig, shard_decode
from .options import backbone_options, config_options, manifest_from, manifest_options, runtime_options


# What a plain `type(default)` cannot say about an option.
_OPTION_EXTRAS = {
    "image_size": {"type": int},
    "layers": {"decls": ["--layer"], "metavar": "NAME[,NAME...]"},
    "preprocess_like": {"metavar": "WEIGHTS"},
    "batch_size": {"type": int},
    "decode": {"type": click.Choice(DECODES)},
}


def shard_options(f):
    """WebDataset input: the val/test splits' shards, where labels come from, the class names;
    Parquet input: the image column."""
    f = click.option("--image-col", default=None, metavar="NAME",
                     help="Parquet: the image column [default: the schema's Image feature, else the one binary "
                          "or {bytes, path} column].")(f)
    f = click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="WebDataset: class names, one per line (line i names class index i) "
                          "[default: 0..the largest label].")(f)
    f = click.option("--label-key", default="cls", show_default=True, metavar="KEY",
                     help="WebDataset: 'cls' = the integer in each sample's .cls; another name = that field "
                          "of its .json (a class index, or a name in --classes).")(f)
    f = click.option("--test", "test_shards", default=None, metavar="PATTERN", help="WebDataset: the test split's shards.")(f)
    f = click.option("--val", "val_shards", default=None, metavar="PATTERN", help="WebDataset: the val split's shards.")(f)
    return f


@click.command("extract")
@click.argument("data", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Cache file to create or extend (.h5).")
@backbone_options
@config_options(ExtractConfig, _OPTION_EXTRAS)
@runtime_options
@click.option("--overwrite", is_flag=True, help="Replace a cache made with another configuration.")
@manifest_options()
@shard_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_command(data, out, overwrite, path_col, label_col, val_fraction, val_shards, test_shards, label_key,
                    classes_file, image_col, quiet, **options):
    """Cache CNN codes of every image under DATA to an HDF5 file.

    DATA is DATA/<class>/<image>, DATA/{train,val,test}/<class>/<image>, or a CSV manifest
    with columns path,label[,split]. Rerun the same command to resume after a crash or to
    add images (or rows) that appeared since.

    DATA may also be WebDataset shards (the train split): a pattern such as
    'train-{000000..000099}.tar' or '*.tar' (quoted), a .txt file listing shard paths, or a
    JSON spec {"train": PATTERN, "val": PATTERN}; or Hugging Face Parquet files (a .parquet
    file, a folder of them, its data/ folder, or a pattern; docs/parquet.md). Whatever the
    input, -o is an index over one output shard per input shard (docs/scale.md).
    """
    from ..sources import FolderSource, source_from_cli
    from ..sources.parquet import is_parquet_input, parquet_source

    config = ExtractConfig(**options)
    if image_col and not is_parquet_input(data):
        raise click.UsageError("--image-col applies to Parquet input (a .parquet file, a folder of them or a pattern)")
    if is_parquet_input(data):
        if val_shards or test_shards or val_fraction is not None:
            raise click.UsageError("Parquet splits come from the file names (train-*, validation-*, test-*); "
                                   "drop --val/--test/--val-fraction")
        shards = parquet_source(data, image_col, None if label_col == "label" else label_col)
    else:
        shards = source_from_cli(data, val_shards, test_shards, label_key, classes_file)
    if shards and val_fraction is not None:
        raise click.UsageError("--val-fraction applies to CSV manifests; give WebDataset val shards with --val PATTERN")
    if not shards and (label_key != "cls" or classes_file):
        raise click.UsageError("--label-key and --classes apply to WebDataset shards; a folder's classes are its "
                               "subfolders, a CSV's its label column (--label-col)")
    if not shards:
        from ..folders import discover

        manifest = manifest_from(path_col, label_col, val_fraction, config.seed)
        shards = FolderSource(discover(data, manifest), config.shard_size)
    if not overwrite and _report_if_up_to_date(shards, out, config):
        return
    from ..extract import extract

    r = extract(shards, out, config, overwrite=overwrite, progress=not quiet, log=lambda m: click.echo(m, err=True))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports for all
    _echo_skipped(r.skipped, out)
    _report(r, out, _counts(r.split_counts))
    if r.decode == "gpu":
        click.echo(_decoders_line(r.decoders, r.fallbacks), err=True)


def _report(r, out, counts: str) -> None:
    """The run's summary: shards done before, extracted, redone and why, failed (exit 2)."""
    s = r.shards
    redone = ", ".join(f"{n} {why}" for why, n in s["redone"].items())
    click.echo(f"extracted {r.extracted} images ({r.codes} codes) from {s['extracted']} input shards in {r.seconds:.1f} s "
               f"({r.images_per_s:.1f} img/s); {s['done']} shards skipped as done"
               + (f", {sum(s['redone'].values())} redone ({redone})" if redone else "")
               + f", {s['failed']} failed; skipped {len(r.skipped)} samples; {out}: {counts} codes")
    if r.failed_shards:
        for path, reason in r.failed_shards:
            click.echo(f"error: {path}: {reason}", err=True)
        click.echo(f"error: {len(r.failed_shards)} input shard(s) could not be read; {out} indexes the others; "
                   f"fix them and rerun the same command to extract them", err=True)
        raise click.exceptions.Exit(2)  # the index holds the others; a rerun retries these


def _report_if_up_to_date(source, out, config: ExtractConfig) -> bool:
    """The rerun on an unchanged input, answered without importing torch (see `uptodate`)."""
    from ..uptodate import request_key, up_to_date, weights_sha256

    request = config.request()
    if not hasattr(source, "layout"):  # shards carry their images: decoded on the CPU
        try:
            request["decode"] = shard_decode(config.decode)
        except CnnCodesError:
            return False  # refused by the full path, with the reason
    key = request_key(weights_sha256=weights_sha256(config.weights), **request)
    done = up_to_date(source, out, key, config.strict)
    if done is None:
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        for w in done.warnings:
            click.echo(f"warning: {w}", err=True)
        _echo_skipped(done.skipped, out)
        click.echo(f"{out} is up to date ({_counts(done.split_counts)} codes); nothing to extract")
    return True


def _decoders_line(decoders: dict[str, int], fallbacks: dict[str, int]) -> str:
    """Who decoded what and why any image went to the CPU path (no silent fallback)."""
    done = ", ".join(f"{n} by {name}" for name, n in decoders.items()) or "nothing"
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(fallbacks.items(), key=lambda kv: -kv[1]))
    return f"decoded: {done}" + (f" (to the CPU path: {why})" if why else "")


def _echo_skipped(skipped: list[tuple[str, str]], out: str) -> None:
    for path, reason in skipped[:10]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(skipped) > 10:
        click.echo(f"... and {len(skipped) - 10} more skipped (see `cnncodes info {out}`)", err=True)


def _counts(split_counts: dict[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in split_counts.items())


@click.command("info")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(cache, as_json):
    """Describe a cache: splits, counts, feature dim, backbone, preprocessing, skipped files."""
    from ..store import Cache
    from ..store.sharded import unique_shard_paths

    with Cache(cache) as c:
        info = c.info()
        unique = info["store"] != "sharded" or unique_shard_paths(c.file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {info['arch']} ({info['weights']}), {info['precision']}, {info['feature_dim']}-d codes")
    p = info["preprocessing"]
    click.echo(f"preprocessing: resize {p['resize']}, center crop {p['crop']}, mean {p['mean']}, std {p['std']}")
    click.echo(f"classes ({len(info['classes'])}): {', '.join(info['classes'])}")
    computed = info["computed_with"]
    click.echo(f"decoded by {info['decode']}; BatchNorm: {computed.get('batchnorm', 'not recorded (an older cache)')}")
    if info["store"] == "sharded":
        click.echo(f"sharded store: an index of virtual datasets over {sum(info['shards'].values())} output shards "
                   f"in {Path(cache).stem}.shards/ (one per input shard; `cnncodes pack` makes one file)")
    if not unique:
        click.echo("warning: this index (of an older cnncodes) names its shards by plain relative paths: plain h5py, "
                   "run with another store's folder as working directory, reads that store's shard where one of "
                   "these is missing (cnncodes refuses it): open it from its own folder, or pack it (`cnncodes pack`)")
    if info["manifest"]:
        m = info["manifest"]
        click.echo(f"manifest: {m['path']} (sha256 {m['sha256'][:12]}), splits from {m['splits_from']}"
                   + (f" {m['val_fraction']} (seed {m['seed']})" if m["val_fraction"] is not None else ""))
    for name, s in info["splits"].items():
        click.echo(f"{name}: {s['images']} images, {s['codes']} codes ({s['views_per_image']} extra views each), "
                   f"{len(s['skipped'])} skipped")
        for item in s["skipped"]:
            click.echo(f"  skipped {item['path']}: {item['reason']}")
    v = info["versions"]
    click.echo(f"made with cnncodes {v['cnncodes']}, torch {v['torch']}, torchvision {v['torchvision']}")
