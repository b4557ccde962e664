"""`cnncodes finetune`: a thin layer over `cnncodes.finetune.finetune`.

The recipe options are built from `FinetuneConfig`'s fields (flag, default and help), so a new
field is a new option; the command collects them into one config and passes it whole.
"""

from __future__ import annotations

import click

from ..finetune.config import OPTIMIZERS, FinetuneConfig
from .options import backbone_options, config_options, manifest_from, manifest_options, runtime_options

# What a plain `type(default)` cannot say about an option.
_OPTION_EXTRAS = {
    "optimizer": {"type": click.Choice(OPTIMIZERS)},
    "freeze": {"type": str, "default": "", "metavar": "NAMES", "show_default": False},  # a comma list
    "image_size": {"type": int},
    "preprocess_like": {"metavar": "WEIGHTS"},
    "head_lr_mult": {"type": float, "show_default": False},  # None: resolved by the config (see its help)
    "init_head": {"type": click.Path(dir_okay=False), "metavar": "HEAD.h5"},
}


@click.command("finetune")
@click.argument("data", type=click.Path(path_type=str))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoint, logs, curves and the final model.pt.")
@backbone_options
@config_options(FinetuneConfig, _OPTION_EXTRAS)
@runtime_options
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete a previous run's outputs in the run folder and start over.")
@manifest_options()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune_command(data, run_dir, resume, overwrite, quiet, path_col, label_col, val_fraction, **options):
    """Fine-tune a pretrained backbone (--arch: any torchvision classifier or timm:NAME) end to end on DATA.

    DATA is DATA/<class>/<image>, DATA/{train,val}/<class>/<image>, or a CSV manifest with
    columns path,label[,split] (--val-fraction draws val rows, seeded by --seed). The model of the last
    epoch is reported and saved as RUN_DIR/model.pt. Under `torchrun --nproc_per_node N -m
    cnncodes finetune ...` it trains with DistributedDataParallel.
    """
    from ..finetune import finetune

    config = FinetuneConfig(**options)
    manifest = manifest_from(path_col, label_col, val_fraction, config.seed)
    finetune(data, run_dir, config, resume=resume, overwrite=overwrite, progress=not quiet, echo=click.echo,
             manifest=manifest)
