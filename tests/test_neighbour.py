"""The CLI sets a short OpenMP spin before torch loads, so extract shares the cores with other jobs
(bench/neighbour.py measures it; docs/scale.md, "Beside other jobs"). No timings here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cnncodes.runtime import OPENMP_SPINCOUNT, share_cores_politely

# What torch's OpenMP runtime read when it loaded: libgomp prints its settings with OMP_DISPLAY_ENV=VERBOSE.
PROBE = "import sys, cnncodes.cli; assert 'torch' not in sys.modules; import torch; torch.ones(8).sum()"


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})


def _libgomp_spincount(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.strip().startswith("GOMP_SPINCOUNT ="):
            return line.split("=", 1)[1].strip().strip("'")
    pytest.skip("torch's OpenMP runtime is not GNU OpenMP (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")


def test_cli_sets_the_spin_before_torch_loads():
    """In a fresh interpreter, importing the CLI (as `cnncodes` and `python -m cnncodes` do first)
    sets GOMP_SPINCOUNT before torch is imported, and libgomp reads it when torch loads it."""
    assert _libgomp_spincount(_fresh(PROBE).stderr) == OPENMP_SPINCOUNT


def test_without_the_cli_libgomp_keeps_its_default():
    """The control: the same probe without the CLI import shows libgomp's own (long) default spin."""
    assert _libgomp_spincount(_fresh("import torch; torch.ones(8).sum()").stderr) != OPENMP_SPINCOUNT


@pytest.mark.parametrize("var,value", [("GOMP_SPINCOUNT", "123"), ("OMP_WAIT_POLICY", "ACTIVE"), ("KMP_BLOCKTIME", "5")])
def test_a_wait_policy_the_user_set_wins(var, value):
    env: dict = {var: value}
    assert share_cores_politely(env) is False
    assert env == {var: value}
    if var == "GOMP_SPINCOUNT":
        assert _libgomp_spincount(_fresh(PROBE, **env).stderr) == value


def test_sets_the_spin_in_an_environment_without_one():
    env: dict = {"PATH": "/bin"}
    assert share_cores_politely(env) is True
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": OPENMP_SPINCOUNT}


def test_too_late_once_torch_is_loaded(monkeypatch):
    """In a process that has loaded torch already, setting the variable would record a setting
    that is not in force: nothing is set."""
    import torch  # noqa: F401

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    assert share_cores_politely() is False
    assert "GOMP_SPINCOUNT" not in os.environ
