"""`cnncodes finetune`: a thin layer over `cnncodes.finetune.finetune`."""

from __future__ import annotations

import click

from .options import backbone_options, runtime_options

STAGES = "stem,layer1,layer2,layer3,layer4"


@click.command("finetune")
@click.argument("data", type=click.Path(path_type=str))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoint, logs, curves and the final model.pt.")
@backbone_options
@click.option("--epochs", type=int, default=25, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per step (per process under torchrun).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate of the pretrained layers.")
@click.option("--head-lr-mult", type=float, default=1.0, show_default=True, help="The new fc layer's lr = lr x this.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="sgd uses momentum 0.9.")
@click.option("--lr-step", type=int, default=7, show_default=True, help="StepLR: epochs between lr decays.")
@click.option("--lr-gamma", type=float, default=0.1, show_default=True, help="StepLR: lr decay factor.")
@click.option("--freeze", default="", metavar="STAGES",
              help=f"Comma list of stages to keep fixed (weights and BatchNorm statistics), among {STAGES}.")
@click.option("--image-size", type=int, default=None, help="Crop size; resize keeps the weights' ratio (256/224).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and augmentation.")
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms: a rerun or resume gives bitwise the same weights.")
@click.option("--select-best-on-val", is_flag=True,
              help="Also save the epoch with the best val accuracy (an OPTIMISTIC figure: chosen on val).")
@runtime_options
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete a previous run's outputs in the run folder and start over.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune_command(data, run_dir, arch, weights, epochs, batch_size, lr, head_lr_mult, weight_decay, optimizer,
                     lr_step, lr_gamma, freeze, image_size, seed, deterministic, select_best_on_val, workers, device,
                     precision, channels_last, resume, overwrite, quiet):
    """Fine-tune a pretrained ResNet end to end on the image folder DATA.

    DATA is DATA/<class>/<image> or DATA/{train,val}/<class>/<image>. The model of the last
    epoch is reported and saved as RUN_DIR/model.pt. Under `torchrun --nproc_per_node N -m
    cnncodes finetune ...` it trains with DistributedDataParallel.
    """
    from ..finetune import finetune

    finetune(data, run_dir, arch=arch, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr,
             head_lr_mult=head_lr_mult, weight_decay=weight_decay, optimizer=optimizer, lr_step=lr_step,
             lr_gamma=lr_gamma, freeze=freeze, image_size=image_size, precision=precision,
             channels_last=channels_last, workers=workers, device=device, seed=seed, deterministic=deterministic,
             select_best_on_val=select_best_on_val, resume=resume, overwrite=overwrite, progress=not quiet,
             echo=click.echo)
