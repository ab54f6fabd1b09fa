"""Shared fixtures: the committed tiny checkpoints (tests/fixtures/format_*) and their PyTorch reference outputs.

The reference numbers were computed by transformers/timm (see tests/fixtures/make_fixtures.py),
never by this project's code.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastvlm_mlx  # noqa: F401  first, as an app should: it preloads the optimized BLAS before mlx.core

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FORMATS = ("format_a", "format_b", "format_c")
PHOTO = FIXTURES / "images" / "photo.png"
PHOTO2 = FIXTURES / "images" / "photo2.png"


def pytest_report_header(config):
    from precision import DEVICE, DTYPE, _cpu_layer_missing

    layer = _cpu_layer_missing() or "on"
    return f"fastvlm-mlx: device {DEVICE}, models compute in {DTYPE} (tests/precision.py), CPU layer: {layer}"


@pytest.fixture(scope="session")
def reference():
    import mlx.core as mx

    arrays = mx.load(str(FIXTURES / "reference.safetensors"))
    meta = json.loads((FIXTURES / "reference.json").read_text())
    return arrays, meta


@pytest.fixture(scope="session")
def ct():
    """coremltools, or a skip that says why (it is an optional dependency, installed in CI)."""
    from fastvlm_convert.coreml import require_coremltools

    try:
        return require_coremltools()
    except Exception as e:
        pytest.skip(f"coremltools unavailable: {e}")


@pytest.fixture
def fixture_copy(tmp_path):
    """Copy a fixture checkpoint into tmp_path so a test can damage it."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return copy


def run_cli(*args, timeout=300, **kwargs):
    """Run ``python -m <args>`` as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=kwargs.pop("cwd", ROOT),
        input=kwargs.pop("input", None),
    )


def assert_clean_error(proc, *words):
    """Non-zero exit, one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def rel_err(a, b) -> float:
    import mlx.core as mx

    a, b = mx.array(a).astype(mx.float32), mx.array(b).astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()
