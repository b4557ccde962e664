"""`ExtractConfig`: every option of an extraction, held once and validated once. Torch-free: the
CLI builds its `extract` options from these fields (flag, default, help) and answers an
up-to-date rerun without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import IMAGE_SIZE_RULE, MIN_IMAGE_SIZE, option
from ..errors import CnnCodesError
from ..precision import PRECISIONS
from ..sources.folder import SHARD_SIZE

DECODES = ("auto", "cpu", "gpu")
# Nothing unmeasured is the default: `--decode auto` decodes on the GPU only once a device check
# (bench/device_check.py) has passed on a real GPU and its bench/results/device_check.json is
# committed; that commit sets this to True. Until then auto = CPU decoding in worker processes.
GPU_DECODE_MEASURED = False
# The fields that decide the codes: a cache is up to date for a request only if these match.
CODE_FIELDS = ("arch", "weights", "image_size", "layers", "preprocess_like", "views", "eval_views", "seed", "precision",
               "decode")


def resolve_decode(decode: str, device_type: str) -> str:
    """Where JPEGs are decoded, "cpu" or "gpu", for a network on `device_type` ("cpu", "cuda").

    'auto' is the CPU until `GPU_DECODE_MEASURED`; 'gpu' without CUDA is an error."""
    if decode not in DECODES:
        raise CnnCodesError(f"unknown --decode '{decode}'; use one of {', '.join(DECODES)}")
    if decode == "gpu" and device_type != "cuda":
        raise CnnCodesError("--decode gpu needs the network on a CUDA device (--device cuda); use --decode cpu")
    if decode == "auto":
        return "gpu" if GPU_DECODE_MEASURED and device_type == "cuda" else "cpu"
    return decode


def shard_decode(decode: str) -> str:
    """Where WebDataset samples are decoded: the CPU (the nvJPEG loader reads files by path); said, never silent."""
    if decode == "gpu":
        raise CnnCodesError("--decode gpu reads image files by path; WebDataset shards are decoded on the CPU: "
                            "drop --decode gpu (or use --decode cpu)")
    return "cpu"


@dataclass(frozen=True)
class ExtractConfig:
    """The options of `extract`, grouped like the CLI's; invalid values raise CnnCodesError.
    Change a copy with `dataclasses.replace(config, arch=...)` (validated again)."""

    # what the codes are
    arch: str = option("resnet18", "Backbone.")
    weights: str = option("DEFAULT", "torchvision weights name, a local state_dict file, or 'none'.")
    image_size: int | None = option(None, "Crop size; resize keeps the weights' ratio (256/224).")
    layers: str | None = option(None, "Cache pooled codes of these intermediate layers, concatenated "
                                      "(`cnncodes archs ARCH --layers`).")
    preprocess_like: str | None = option(None, "With --weights FILE: use these named weights' preprocessing "
                                               "(e.g. DEFAULT) [default: the published weights the file is "
                                               "(sha256), else the arch's original recipe, IMAGENET1K_V1's; none: DEFAULT's].")
    views: int = option(0, "Extra augmented codes per training image.")
    eval_views: int = option(0, "Extra augmented codes per val/test image (for test-time averaging).")
    seed: int = option(0, "Seed of the augmented views (and of --val-fraction's split).")
    precision: str = option("fp32", "Autocast precision.")
    # how they are computed (same codes whatever these are)
    batch_size: int | None = option(None, "Images per forward pass [default: 16 on CPU, 128 on CUDA].")
    channels_last: bool = option(True, "NHWC memory layout.")
    workers: int | None = option(None, "Decode workers [default: sized to the machine].")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    decode: str = option("auto", "Where JPEGs are decoded: cpu = PIL (worker processes beside a GPU); gpu = nvJPEG "
                                 "batches on the CUDA device (opt-in: not yet measured on a GPU); auto = cpu for now.")
    strict: bool = option(False, "Stop at the first unreadable file instead of skipping it.")
    shard_size: int = option(SHARD_SIZE, "Folder/CSV input: images per shard, on average (the unit of work a "
                                         "rerun keeps or redoes; cut by file-name hash so edits stay local).")

    def __post_init__(self) -> None:
        checks = [
            (self.views >= 0 and self.eval_views >= 0, "--views and --eval-views must be >= 0"),
            (self.image_size is None or self.image_size >= MIN_IMAGE_SIZE, IMAGE_SIZE_RULE),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.shard_size >= 1, "--shard-size must be >= 1"),
            (self.precision in PRECISIONS, f"unknown --precision '{self.precision}'; use one of {', '.join(PRECISIONS)}"),
            (self.decode in DECODES, f"unknown --decode '{self.decode}'; use one of {', '.join(DECODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CnnCodesError(message)

    def request(self) -> dict:
        """The fields that decide the codes, by name (the up-to-date key is made of them); `decode` as
        resolved where that needs no device ('auto' stays 'auto' once it may mean the GPU)."""
        request = {name: getattr(self, name) for name in CODE_FIELDS}
        if request["decode"] == "auto" and not GPU_DECODE_MEASURED:
            request["decode"] = "cpu"
        return request
