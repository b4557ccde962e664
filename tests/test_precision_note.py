"""bf16 on a CPU without bf16 instructions is emulated and slow: said before the run, never switched."""

from __future__ import annotations

import h5py
import pytest
import torch
from conftest import write_folder

from cnncodes import precision
from cnncodes.extract import extract


@pytest.mark.parametrize("native", [False, True])
def test_emulated_bf16_is_named_before_the_run_and_kept(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    data = write_folder(tmp_path / "data", {"train": 2}, size=40)
    lines: list[str] = []
    extract(data, tmp_path / "c.h5", arch="resnet18", weights="none", image_size=32, precision="bf16",
            progress=False, log=lines.append)
    said = [line for line in lines if "bf16 is emulated" in line]
    assert len(said) == (0 if native else 1)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["precision"] == "bf16"  # what was asked is what ran


def test_no_note_for_fp32_or_on_cuda(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.emulation_note("fp32", torch.device("cpu")) is None
    assert precision.emulation_note("bf16", torch.device("cuda")) is None
    assert "--precision fp32" in precision.emulation_note("bf16", torch.device("cpu"))
