"""The recipe's options, held once: `FinetuneConfig` (validated once) and the `Recipe` derived from it.

`FinetuneConfig` is what a caller chooses; `Recipe` is what determines the trained weights (the
config's weight-relevant fields plus what the run resolved: the weights' identity, the classes,
the preprocessing, the world size). The Recipe is stored in every checkpoint and log and compared
on --resume. The CLI builds its options from the config's fields (their defaults and `help`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from ..config import IMAGE_SIZE_RULE, MIN_IMAGE_SIZE, option
from ..errors import CnnCodesError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # ResNet stages, in network order (other archs: their own)
OPTIMIZERS = ("sgd", "adamw")
VAL_SPLITS = ("val", "valid", "validation")
# Recipe keys that may differ on --resume: more epochs extend the run, and a new world size
# only changes how the data are split between processes.
RESUMABLE_CHANGES = ("epochs", "world_size")
# The new classifier's lr = lr x head_lr_mult. A fresh (random) classifier gets FRESH_HEAD_LR_MULT;
# one started from a trained head (--init-head, LP-FT) at most the body's lr: it is already near its
# optimum, and a larger step would first move it away from it while the features change under it
# (Kumar et al., ICLR 2022, fine-tune the whole network at one lr after the linear probe).
FRESH_HEAD_LR_MULT = 1.0
INIT_HEAD_LR_MULT = min(FRESH_HEAD_LR_MULT, 1.0)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of a fine-tuning run, grouped like the CLI's; invalid values raise CnnCodesError.

    `freeze` accepts 'stem,layer1' or any iterable of stage names or parameter-name prefixes and is
    stored as a tuple (ResNet stages in network order); the names are checked against the arch, and
    put in its network order, when the run starts (`model.freeze_order`). Change a copy with `dataclasses.replace(config, lr=...)` (validated again).
    """

    # model
    arch: str = option("resnet18", "Backbone.")
    weights: str | None = option("DEFAULT", "torchvision weights name, a local state_dict file, or 'none'.")
    freeze: tuple[str, ...] = option((), "Comma list of stages to keep fixed (weights and BatchNorm statistics): "
                                          f"the arch's own stages/blocks (ResNet: {','.join(STAGES)}; a bad name "
                                          "lists them) or parameter-name prefixes.")
    init_head: str | None = option(None, "LP-FT: start the classifier from this `fit-head` head (HEAD.h5, any "
                                          "--clf; same arch, weights, preprocessing and classes as this run).")
    image_size: int | None = option(None, "Crop size; resize keeps the weights' ratio (256/224).")
    preprocess_like: str | None = option(None, "With --weights FILE or none: these named weights' preprocessing "
                                                "(e.g. DEFAULT) [default: the published weights the file is "
                                                "(sha256), else the arch's original recipe, IMAGENET1K_V1's; none: DEFAULT's].")
    # optimisation
    optimizer: str = option("sgd", "sgd uses momentum 0.9.")
    lr: float = option(1e-3, "Learning rate of the pretrained layers.")
    head_lr_mult: float | None = option(None, "The classifier's lr = lr x this [default: "
                                               f"{FRESH_HEAD_LR_MULT:g}; {INIT_HEAD_LR_MULT:g} with --init-head].")
    weight_decay: float = option(0.0, "Weight decay of every trainable parameter.")
    lr_step: int = option(7, "StepLR: epochs between lr decays.")
    lr_gamma: float = option(0.1, "StepLR: lr decay factor.")
    epochs: int = option(25, "Epochs to train (with --resume: the total, so more epochs extend a run).")
    batch_size: int = option(32, "Images per step (per process under torchrun).")
    # runtime
    precision: str = option("fp32", "Autocast precision (fp16 needs CUDA).")
    channels_last: bool = option(True, "NHWC memory layout (faster convolutions on CPU and tensor cores).")
    workers: int | None = option(None, "Decode workers [default: sized to the machine].")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    seed: int = option(0, "Seed of data order and augmentation.")
    deterministic: bool = option(False, "Deterministic algorithms: a rerun or resume gives bitwise the same weights.")
    # evaluation
    select_best_on_val: bool = option(False, "Also save the epoch with the best val accuracy "
                                              "(an OPTIMISTIC figure: chosen on val).")

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "--epochs must be >= 0 (0: save the initial model, e.g. the --init-head head, as is)"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (BatchNorm cannot train on one image)"),
            (self.lr > 0, "--lr must be > 0"),
            (self.head_lr_mult is None or self.head_lr_mult > 0, "--head-lr-mult must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.lr_step >= 1, "--lr-step must be >= 1"),
            (0 < self.lr_gamma <= 1, "--lr-gamma must be in (0, 1]"),
            (self.image_size is None or self.image_size >= MIN_IMAGE_SIZE, IMAGE_SIZE_RULE),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer '{self.optimizer}'; use one of {', '.join(OPTIMIZERS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CnnCodesError(message)
        object.__setattr__(self, "freeze", parse_freeze(self.freeze))  # frozen: normalised once, here
        from ..backbones import check_arch  # lazy: the CLI builds options from this module without torch

        check_arch(self.arch)

    @property
    def resolved_head_lr_mult(self) -> float:
        """head_lr_mult as given, else the default for a fresh or an --init-head classifier."""
        if self.head_lr_mult is not None:
            return self.head_lr_mult
        return INIT_HEAD_LR_MULT if self.init_head else FRESH_HEAD_LR_MULT

    def recipe(self, weights_identity: str, classes: Iterable[str], preprocessing: dict, world_size: int,
               init_head: str | None = None) -> Recipe:
        """The Recipe of a run of this config: its weight-relevant fields plus what the run resolved
        (`init_head`: the identity of the --init-head file, see `lpft.InitHead`)."""
        resolved = {"weights": weights_identity, "classes": tuple(classes), "preprocessing": preprocessing,
                    "world_size": world_size, "head_lr_mult": self.resolved_head_lr_mult, "init_head": init_head}
        chosen = {f.name: getattr(self, f.name) for f in fields(Recipe) if f.name not in resolved}
        return Recipe(**resolved, **chosen)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; stored in the checkpoint, checked on resume.

    The field names and order are the checkpoint's and log.json's `recipe` format: keep them.
    Fields other than weights, classes, preprocessing, world_size and init_head are FinetuneConfig's
    (head_lr_mult with its default resolved).
    """

    arch: str
    weights: str  # WeightsInfo.identity
    classes: tuple[str, ...]
    preprocessing: dict
    epochs: int
    batch_size: int
    lr: float
    head_lr_mult: float
    weight_decay: float
    optimizer: str
    lr_step: int
    lr_gamma: float
    freeze: tuple[str, ...]
    precision: str
    channels_last: bool
    seed: int
    deterministic: bool
    select_best_on_val: bool
    world_size: int
    init_head: str | None = None  # sha256 identity of the --init-head file (LP-FT); None: a fresh classifier

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def parse_freeze(freeze: str | Iterable[str] | None) -> tuple[str, ...]:
    """'stem,layer1' or an iterable of names -> a tuple without repeats, ResNet stages first in network order.

    Which names an arch takes depends on its model: they are checked where it is known (`model.resolve_freeze`).
    """
    if freeze is None:
        return ()
    names = freeze.split(",") if isinstance(freeze, str) else list(freeze)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    return tuple(sorted(names, key=lambda n: STAGES.index(n) if n in STAGES else len(STAGES)))
