"""What the options dataclasses share (`extract.ExtractConfig`, `heads.HeadConfig`, `finetune.FinetuneConfig`):
fields that carry their CLI help, and a config changed by keyword overrides. Torch-free."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")
# The smallest --image-size: the networks downsample 32x, so a smaller crop leaves no pixels.
MIN_IMAGE_SIZE = 32
IMAGE_SIZE_RULE = f"--image-size must be >= {MIN_IMAGE_SIZE} (the networks downsample {MIN_IMAGE_SIZE}x)"


def option(default: Any, help: str = "") -> Any:  # noqa: A002  (click's word)
    """A config field whose `help` the CLI shows beside its flag."""
    return dataclasses.field(default=default, metadata={"help": help})


def with_overrides(cls: type[C], config: C | None, overrides: dict[str, Any], caller: str) -> C:
    """`config` (default `cls()`) with `overrides`, any of its fields by name; an unknown name
    is a TypeError naming the fields, as a misspelt keyword argument would be."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"its options are the fields of {cls.__name__}: {', '.join(sorted(names))}")
    return dataclasses.replace(cls() if config is None else config, **overrides)
