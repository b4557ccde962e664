"""`cnncodes extract` and `cnncodes info`."""

from __future__ import annotations

import json
import os

import click

from .options import backbone_options, runtime_options


@click.command("extract")
@click.argument("data", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Cache file to create or extend (.h5).")
@backbone_options
@click.option("--image-size", type=int, default=None, help="Crop size; resize keeps the weights' ratio (256/224).")
@click.option("--layer", "layers", default=None, metavar="NAME[,NAME...]",
              help="Cache pooled codes of these intermediate layers, concatenated (`cnncodes archs ARCH --layers`).")
@click.option("--preprocess-like", default=None, metavar="WEIGHTS",
              help="With --weights FILE: use these named weights' preprocessing (e.g. IMAGENET1K_V1) [default: DEFAULT's].")
@click.option("--views", type=int, default=0, show_default=True, help="Extra augmented codes per training image.")
@click.option("--eval-views", type=int, default=0, show_default=True, help="Extra augmented codes per val/test image (for test-time averaging).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the augmented views.")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 16 on CPU, 128 on CUDA].")
@runtime_options
@click.option("--strict", is_flag=True, help="Stop at the first unreadable file instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with another configuration.")
@click.option("--checkpoint-every", type=float, default=30.0, show_default=True, help="Seconds between resumable shard writes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_command(data, out, arch, weights, image_size, layers, preprocess_like, views, eval_views, seed, batch_size, workers, device,
                    precision, channels_last, strict, overwrite, checkpoint_every, quiet):
    """Cache CNN codes of every image under DATA to an HDF5 file.

    DATA is DATA/<class>/<image> or DATA/{train,val,test}/<class>/<image>. Rerun the same
    command to resume after a crash or to add images that appeared since.
    """
    from ..extract import extract

    r = extract(data, out, arch=arch, weights=weights, image_size=image_size, layers=layers, preprocess_like=preprocess_like, views=views, eval_views=eval_views,
                seed=seed, batch_size=batch_size, workers=workers, device=device, precision=precision,
                channels_last=channels_last, strict=strict, overwrite=overwrite, checkpoint_every=checkpoint_every,
                progress=not quiet, log=lambda m: click.echo(m, err=True))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports for all
    for path, reason in r.skipped[:10]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(r.skipped) > 10:
        click.echo(f"... and {len(r.skipped) - 10} more skipped (see `cnncodes info {out}`)", err=True)
    counts = ", ".join(f"{s} {n}" for s, n in r.split_counts.items())
    if r.up_to_date:
        click.echo(f"{out} is up to date ({counts} codes); nothing to extract")
    else:
        click.echo(f"extracted {r.extracted} images ({r.codes} codes) in {r.seconds:.1f} s "
                   f"({r.images_per_s:.1f} img/s); skipped {len(r.skipped)} files; {out}: {counts} codes")


@click.command("info")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(cache, as_json):
    """Describe a cache: splits, counts, feature dim, backbone, preprocessing, skipped files."""
    from ..store import Cache

    with Cache(cache) as c:
        info = c.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {info['arch']} ({info['weights']}), {info['precision']}, {info['feature_dim']}-d codes")
    p = info["preprocessing"]
    click.echo(f"preprocessing: resize {p['resize']}, center crop {p['crop']}, mean {p['mean']}, std {p['std']}")
    click.echo(f"classes ({len(info['classes'])}): {', '.join(info['classes'])}")
    for name, s in info["splits"].items():
        click.echo(f"{name}: {s['images']} images, {s['codes']} codes ({s['views_per_image']} extra views each), "
                   f"{len(s['skipped'])} skipped")
        for item in s["skipped"]:
            click.echo(f"  skipped {item['path']}: {item['reason']}")
    v = info["versions"]
    click.echo(f"made with cnncodes {v['cnncodes']}, torch {v['torch']}, torchvision {v['torchvision']}")


def register(cli: click.Group) -> None:
    cli.add_command(extract_command)
    cli.add_command(info_command)
