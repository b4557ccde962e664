"""`cnncodes select`: extract several backbones and keep the head chosen among them by CV on train."""

from __future__ import annotations

import click

from ..precision import PRECISIONS
from .head_cmd import fit_head_options, parse_head_options, print_candidates, print_report


@click.command("select")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--arch", "spec", required=True, metavar="SPEC",
              help="Backbones to compare, ARCH[=WEIGHTS][@LIKE],... (e.g. resnet50=r50.pth@IMAGENET1K_V1,"
                   "timm:tf_efficientnet_lite2=lite2.pth).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Folder for one cache per backbone (<name>.h5), head.h5 and report.json.")
@fit_head_options
@click.option("--image-size", type=int, default=None, help="Crop size for every backbone [default: each one's own].")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS), help="Extraction precision.")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 16 on CPU, 128 on CUDA].")
@click.option("--workers", type=int, default=None, help="Decode workers [default: sized to the machine].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def select_command(data, spec, out, concat, show_all_val, image_size, precision, batch_size, workers, quiet, **options):
    """Extract DATA with each backbone of --arch (one resumable cache each), score every
    (backbone, head) by the same grouped CV on train, refit the best and evaluate only it on
    val/test. Rerun the same command to resume: finished caches are not extracted again.
    """
    from ..extract import ExtractConfig
    from ..select import parse_backbones, select_backbone

    clfs, head_config = parse_head_options(options)
    backbones = parse_backbones(spec)
    extract_config = ExtractConfig(image_size=image_size, precision=precision, batch_size=batch_size, workers=workers,
                                   device=head_config.device)
    head, report = select_backbone(data, out, backbones, extract_config, head_config, clfs, concat, show_all_val,
                                   progress=not quiet, log=lambda m: click.echo(m, err=True))
    times = {b["name"]: f"{b['extract_seconds']:.1f}" for b in report["backbones"]}
    print_candidates(report, times)
    print_report(report)
    for b in report["backbones"]:
        pre = b["preprocessing"]
        how = f"resize {pre.get('resize')} crop {pre.get('crop')}" if pre else "?"
        click.echo(f"{b['name']}: extraction {b['extract_seconds']:.1f} s" + (" (up to date)" if b["up_to_date"] else "")
                   + f" + CV {b['cv_seconds']:.1f} s = {b['seconds']:.1f} s; preprocessing {how}"
                   + (f" (like {b['preprocess_like']})" if b["preprocess_like"] else ""))
    click.echo(f"selection took {report['select_seconds']:.1f} s in all; head saved to {out}/head.h5, report to "
               f"{out}/report.json")
