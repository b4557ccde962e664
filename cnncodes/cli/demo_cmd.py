"""`cnncodes demo`: the frozen-extractor path end to end on the embedded digits dataset."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--dir", "workdir", default="cnncodes-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the dataset, cache and head go.")
@click.option("--arch", default="resnet18", show_default=True, help="Backbone (`cnncodes archs` lists them).")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="torchvision weights name, a local state_dict file, or 'none' (used if DEFAULT cannot be had).")
@click.option("--image-size", default=64, show_default=True, type=int, help="Crop size (digits are small).")
def demo_command(workdir, arch, weights, image_size):
    """Extract CNN codes of scikit-learn's digits and fit a logistic-regression head: no download needed."""
    from ..demo import run_demo

    run_demo(workdir, arch=arch, weights=weights, image_size=image_size, log=lambda m: click.echo(m))
