"""Options shared by several commands, declared once, and options built from a config dataclass's fields."""

from __future__ import annotations

import dataclasses

import click

from ..precision import PRECISIONS


# Declared below, shared by `extract` and `finetune` (and `predict`'s runtime); the tests check that
# their defaults are those of ExtractConfig and FinetuneConfig.
SHARED = ("arch", "weights", "workers", "device", "precision", "channels_last")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_options(cls: type, extras: dict[str, dict] | None = None, skip: tuple[str, ...] = SHARED):
    """Click options for the fields of the config dataclass `cls` (but `skip`), in its order: each
    field's default and `help`, booleans as flags; `extras[name]` adds what a plain
    `type(default)` cannot say (a Choice, a metavar, `decls` for another flag name)."""
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def one(f: dataclasses.Field):
        kwargs = {"default": f.default, "show_default": True, "help": f.metadata.get("help") or None}
        if isinstance(f.default, bool):
            decls = [flag(f.name)] if not f.default else [f"{flag(f.name)}/--no-{flag(f.name)[2:]}"]
            kwargs.update(is_flag=not f.default, show_default=f.default)
        else:
            decls = [flag(f.name)]
            if isinstance(f.default, (int, float, str)):  # a tuple default would make click split text into letters
                kwargs["type"] = type(f.default)
        kwargs.update((extras or {}).get(f.name, {}))
        decls = kwargs.pop("decls", decls)
        return click.option(*decls, f.name, **kwargs)

    def decorate(func):
        for f in reversed(fields):
            func = one(f)(func)
        return func

    return decorate


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
                     help="fp32 (true float32, TF32 off), tf32, bf16 or fp16 (tf32 and fp16 need CUDA).")(f)
    f = click.option("--channels-last/--no-channels-last", default=True, show_default=True,
                     help="NHWC memory layout (faster convolutions on CPU and tensor cores).")(f)
    return f


def manifest_options(split: bool = True):
    """--path-col/--label-col (and with `split`, --val-fraction) for a DATA given as a CSV manifest."""

    def decorate(f):
        if split:
            f = click.option("--val-fraction", type=float, default=None, metavar="F",
                             help="CSV without a split column: a seeded, stratified fraction F of each label "
                                  "becomes val (seed: --seed) [default: all rows train].")(f)
        f = click.option("--label-col", default="label", show_default=True, help="CSV manifest: the class column.")(f)
        f = click.option("--path-col", default="path", show_default=True,
                         help="CSV manifest: the image path column (relative to the CSV's folder, or absolute).")(f)
        return f

    return decorate


def manifest_from(path_col: str, label_col: str, val_fraction: float | None = None, seed: int = 0):
    """The CLI's manifest options as the `ManifestOptions` the API takes."""
    from ..manifest import ManifestOptions

    return ManifestOptions(path_col=path_col, label_col=label_col, val_fraction=val_fraction, seed=seed)
