"""Options shared by several commands, declared once."""

from __future__ import annotations

import click

from ..runtime import PRECISIONS


def backbone_options(f):
    f = click.option("--weights", default="DEFAULT", show_default=True,
                     help="The arch's weights name (DEFAULT, IMAGENET1K_V1, ...), a local state_dict file, or 'none'.")(f)
    f = click.option("--arch", default="resnet18", show_default=True,
                     help="Backbone: any torchvision classification model (resnet50, densenet121, vit_b_16, ...) "
                          "or timm:NAME; `cnncodes archs` lists them.")(f)
    return f


def runtime_options(f):
    f = click.option("--workers", type=int, default=None, help="Decode workers [default: sized to the machine].")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
                     help="Autocast precision (fp16 needs CUDA).")(f)
    f = click.option("--channels-last/--no-channels-last", default=True, show_default=True,
                     help="NHWC memory layout (faster convolutions on CPU and tensor cores).")(f)
    return f
