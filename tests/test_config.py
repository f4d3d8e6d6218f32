"""The scale switch: CI must run the FAST scale, and the environment variable is validated."""

import os
import subprocess
import sys

import pytest

import sparsity_lib as sl


def _scale_in_subprocess(env_value):
    env = dict(os.environ)
    env.pop("SPARSITY_SCALE", None)
    if env_value is not None:
        env["SPARSITY_SCALE"] = env_value
    out = subprocess.run([sys.executable, "-c", "import sparsity_lib as sl; print(sl.config.SCALE)"],
                         capture_output=True, text=True, env=env)
    return out


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true", reason="only meaningful under CI=true")
def test_ci_runs_fast_scale():
    assert sl.config.SCALE == "fast" and sl.config.FAST


def test_default_is_fast_and_full_is_selectable():
    assert _scale_in_subprocess(None).stdout.strip() == "fast"
    assert _scale_in_subprocess("FULL").stdout.strip() == "full"


def test_bad_scale_is_rejected():
    out = _scale_in_subprocess("huge")
    assert out.returncode != 0 and "SPARSITY_SCALE must be one of" in out.stderr


def test_pick_and_setup():
    assert sl.config.pick(fast=1, full=2) == (1 if sl.config.FAST else 2)
    summary = sl.config.setup(seed=3, quiet=True)
    assert "seed=3" in summary and f"scale={sl.config.SCALE}" in summary


def test_default_threads(monkeypatch):
    monkeypatch.setattr(sl.config.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setattr(sl.config, "FAST", True)
    assert sl.config.default_threads() == 1, "FAST models run on one thread"
    monkeypatch.setattr(sl.config, "FAST", False)
    assert sl.config.default_threads() == 4
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert sl.config.default_threads() == 2, "FULL shares the cores among xdist workers"
