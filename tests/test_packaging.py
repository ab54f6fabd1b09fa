"""What pyproject.toml puts in a wheel: every package folder (the converters under their own name), the C kernels'
sources and header, and console scripts that exist. .ci/wheel installs a real wheel; these are the quick checks."""

import importlib
import importlib.util
import os
import subprocess
import sys
from fnmatch import fnmatch

import pytest
from conftest import FIXTURES, ROOT

from fastvlm_mlx.cpu import native


@pytest.fixture(scope="module")
def pyproject():
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_packaged_and_no_top_level_convert(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    folders = {name: ROOT / mapped.get(name, name.replace(".", "/")) for name in setuptools["packages"]}
    assert all((folder / "__init__.py").is_file() for folder in folders.values()), folders
    found = {p.parent for top in ("fastvlm_mlx", "convert") for p in (ROOT / top).rglob("__init__.py")}
    assert found == set(folders.values())
    assert "convert" not in folders and folders["fastvlm_convert"] == ROOT / "convert"


def test_the_kernel_sources_and_header_are_package_data(pyproject):
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fastvlm_mlx.cpu"]
    for path in native.SOURCES + native.HEADERS:
        assert path.parent == ROOT / "fastvlm_mlx" / "cpu" and any(fnmatch(path.name, p) for p in patterns), path
    included = [p for p in (ROOT / "fastvlm_mlx" / "cpu").iterdir() if p.suffix in (".c", ".h")]
    assert set(included) == set(native.SOURCES + native.HEADERS)  # nothing compiled that is not shipped, or back


def test_console_scripts_name_functions_that_exist(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert {"fastvlm-generate", "fastvlm-chat", "fastvlm-server", "fastvlm-convert", "fastvlm-batch"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_convert_runs_from_a_folder_with_its_own_convert_module(tmp_path):
    """A working directory's convert.py or convert/ must not shadow the converters (Python puts it first on the
    path)."""
    spec = importlib.util.find_spec("fastvlm_convert")
    assert spec is not None and spec.origin == str(ROOT / "convert" / "__init__.py"), (
        f"fastvlm_convert is not this checkout's convert/ ({spec and spec.origin}): pip install -e . again"
    )
    (tmp_path / "convert").mkdir()
    for shadow in (tmp_path / "convert.py", tmp_path / "convert" / "__init__.py"):
        shadow.write_text('raise SystemExit("shadowed")\n')
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastvlm_mlx.convert",
            "--hf-path",
            str(FIXTURES / "format_a"),
            "--mlx-path",
            str(out),
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and "shadowed" not in proc.stderr
