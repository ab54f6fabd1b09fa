"""fastvlm_mlx.cpu.blas: the optimized BLAS must be the one MLX's matmul actually binds to.

Each check runs in a fresh interpreter, because the library has to be loaded before mlx.core is imported.
The binding is checked with the dynamic loader's own report (LD_DEBUG=bindings), not with timings.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, run_cli
from precision import requires_linux_cpu_build

ROOT = Path(__file__).resolve().parents[1]

pytestmark = requires_linux_cpu_build  # the BLAS preload is for MLX's Linux CPU build only

# Imports the blas module by file path so the test does not depend on the package __init__ (which calls it too).
SCRIPT = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("fastvlm_blas", sys.argv[1])
blas = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blas)
path = blas.load_fast_blas()
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((256, 192), dtype=np.float32)
b = rng.standard_normal((192, 128), dtype=np.float32)
c = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
ref = a.astype(np.float64) @ b.astype(np.float64)
print(json.dumps({"loaded": path, "again": blas.load_fast_blas(), "max_err": float(np.abs(c - ref).max())}))
"""


def run_fresh(tmp_path, env_value=None):
    """Run SCRIPT in a new interpreter; return its JSON result and the loader's sgemm binding targets."""
    env = dict(os.environ)
    env.pop("FASTVLM_MLX_BLAS", None)
    if env_value is not None:
        env["FASTVLM_MLX_BLAS"] = env_value
    env["LD_DEBUG"] = "bindings"
    env["LD_DEBUG_OUTPUT"] = str(tmp_path / "ld")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "fastvlm_mlx" / "cpu" / "blas.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld*"))
    # "binding file <mlx lib> [0] to <provider> [0]: normal symbol `cblas_sgemm'"
    targets = re.findall(r"binding file \S*mlx\S* \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'", log)
    return result, targets


def same_library(loaded, target):
    if os.path.isabs(loaded):
        return os.path.realpath(loaded) == os.path.realpath(target)
    return os.path.basename(target) == loaded  # a bare soname found through ld.so.cache


def optimized_library_or_skip():
    # The module alone, by file path: listing candidates neither loads anything nor imports mlx.
    spec = importlib.util.spec_from_file_location("fastvlm_blas_probe", ROOT / "fastvlm_mlx" / "cpu" / "blas.py")
    blas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blas)
    found = blas.candidates()
    if not found:
        pytest.skip("no optimized BLAS installed (apt-get install libopenblas0-pthread, or pip install mkl)")
    return found


def bundled_blas():
    """The mlx-cpu wheel's own reference BLAS (auditwheel-renamed libblas-<hash>.so), if this MLX has one."""
    spec = importlib.util.find_spec("mlx")
    roots = [Path(p).parent / "mlx_cpu.libs" for p in (spec.submodule_search_locations or [])] if spec else []
    return [lib for root in roots if root.is_dir() for lib in root.glob("libblas-*")]


def test_matmul_binds_to_optimized_blas(tmp_path):
    optimized_library_or_skip()
    result, targets = run_fresh(tmp_path)
    assert result["loaded"], "an optimized BLAS is installed but load_fast_blas() loaded nothing"
    assert result["again"] == result["loaded"]
    assert targets, "the loader reported no cblas_sgemm binding for MLX"
    assert all(same_library(result["loaded"], t) for t in targets), targets
    assert result["max_err"] < 1e-3


def test_forced_path(tmp_path):
    path = optimized_library_or_skip()[0]
    result, targets = run_fresh(tmp_path, env_value=path)
    assert result["loaded"] == path
    assert targets and all(same_library(path, t) for t in targets), targets


@pytest.mark.parametrize("value", ["0", "off", "none"])
def test_disabled_loads_nothing(tmp_path, value):
    result, targets = run_fresh(tmp_path, env_value=value)
    assert result["loaded"] is None
    assert result["max_err"] < 1e-3
    if bundled_blas():
        assert targets and all("libblas-" in t and "mlx" in t for t in targets), targets


def run_with_blas_module(script: str) -> str:
    """Run ``script`` in a fresh interpreter (FASTVLM_MLX_BLAS unset) with blas.py's path as argv[1]; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "FASTVLM_MLX_BLAS"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "fastvlm_mlx" / "cpu" / "blas.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_too_late_after_mlx_import(tmp_path):
    """Once mlx.core is imported its symbols are bound: loading then would only mislead --verbose."""
    script = (
        "import importlib.util, sys; import mlx.core\n"
        "spec = importlib.util.spec_from_file_location('b', sys.argv[1]); b = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(b); print(b.load_fast_blas())\n"
    )
    assert run_with_blas_module(script) == "None"


def test_bad_forced_path_does_not_raise(tmp_path):
    result, _ = run_fresh(tmp_path, env_value=str(tmp_path / "no-such-blas.so"))
    assert result["loaded"] is None
    assert result["max_err"] < 1e-3


def test_blas_threads_sets_and_restores(tmp_path):
    """blas_threads(n) is what the vision tower's two-stream conv stages rely on: n inside, the old count after."""
    optimized_library_or_skip()
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('b', sys.argv[1]); b = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(b); b.load_fast_blas()\n"
        "get, _ = b._thread_controls()\n"
        "before = get()\n"
        "with b.blas_threads(1):\n"
        "    inside = get()\n"
        "print(json.dumps({'before': before, 'inside': inside, 'after': get()}))\n"
    )
    result = json.loads(run_with_blas_module(script).splitlines()[-1])
    assert result["inside"] == 1
    assert result["after"] == result["before"]


def test_blas_threads_is_a_no_op_without_a_loaded_library():
    spec = importlib.util.spec_from_file_location("fastvlm_blas_none", ROOT / "fastvlm_mlx" / "cpu" / "blas.py")
    blas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blas)
    assert blas.loaded is None and blas._thread_controls() is None
    with blas.blas_threads(1):
        pass


def test_loading_a_model_after_a_late_import_warns_once():
    """An app that imports mlx.core first gets MLX's slow BLAS; loading a CPU float32 model says so, once."""
    optimized_library_or_skip()  # without one, importing the package first would not help, and nothing is said
    script = (
        "import warnings; warnings.simplefilter('always')\n"
        "import mlx.core\n"
        "import fastvlm_mlx\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    fastvlm_mlx.load({str(ROOT / 'tests' / 'fixtures' / 'format_a')!r})\n"
        f"    fastvlm_mlx.load({str(ROOT / 'tests' / 'fixtures' / 'format_a')!r})\n"
        "print(sum('import fastvlm_mlx first' in str(w.message) for w in caught))\n"
    )
    # the CPU layer on, in float32 (FASTVLM_MLX_DTYPE unset: the CPU's default)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVLM_MLX_BLAS", "FASTVLM_MLX_CPU", "FASTVLM_MLX_DTYPE")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "1"


# Loads the fixture model twice after the imports that argv[1] names, then reports what the BLAS check saw.
BOUND_SCRIPT = r"""
import ctypes, json, sys, warnings
if sys.argv[1] == "dlopen":
    ctypes.CDLL(sys.argv[3], mode=ctypes.RTLD_GLOBAL)
if sys.argv[1] != "package-first":
    import mlx.core
import fastvlm_mlx
from fastvlm_mlx.cpu import attention, blas
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastvlm_mlx.load(sys.argv[2])
    fastvlm_mlx.load(sys.argv[2])
kernel = attention.kernel()
print(json.dumps({"loaded": blas.loaded, "bound": blas.bound_library(),
                  "warnings": [str(w.message) for w in caught if "BLAS" in str(w.message)],
                  "kernel_sgemm": kernel[1] if kernel else None,
                  "bound_sgemm": ctypes.cast(ctypes.CDLL(blas.bound_library()).cblas_sgemm, ctypes.c_void_p).value}))
"""


def load_fixture_after(order, library=None, env_extra=None):
    """Run BOUND_SCRIPT in a fresh interpreter; its JSON result and its stderr."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FASTVLM_MLX_BLAS", "FASTVLM_MLX_CPU", "FASTVLM_MLX_DTYPE", "LD_PRELOAD")
    }
    env.update(env_extra or {})
    args = [sys.executable, "-c", BOUND_SCRIPT, order, str(ROOT / "tests" / "fixtures" / "format_a"), library or ""]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("how", ["dlopen", "LD_PRELOAD"])
def test_a_blas_the_program_bound_itself_keeps_every_kernel(how):
    """A program that bound OpenBLAS itself and then imported mlx before fastvlm_mlx: MLX calls OpenBLAS, so
    nothing is said and the kernels that call BLAS stay on, calling the very library MLX is bound to."""
    found = [p for p in optimized_library_or_skip() if os.path.isabs(p) and "openblas" in p and "cmeel" not in p]
    if not found:
        pytest.skip("no system OpenBLAS to preload (apt-get install libopenblas0-pthread)")
    env = {"LD_PRELOAD": found[0]} if how == "LD_PRELOAD" else None
    result, stderr = load_fixture_after("dlopen" if how == "dlopen" else "mlx-first", found[0], env)
    assert result["warnings"] == [], result["warnings"]
    assert "BLAS" not in stderr, stderr
    assert same_library(found[0], result["bound"])
    assert result["loaded"] and same_library(result["loaded"], result["bound"])
    assert result["kernel_sgemm"] == result["bound_sgemm"], "the attention kernel is off or calls another BLAS"


def test_the_reference_blas_is_said_in_exactly_one_line():
    """FASTVLM_MLX_BLAS=0 keeps MLX's bundled reference BLAS: two loads give one warning of one line, naming
    the library and a fix, and the BLAS-calling kernels are off."""
    if not bundled_blas():
        pytest.skip("this MLX build bundles no reference BLAS")
    result, _ = load_fixture_after("package-first", env_extra={"FASTVLM_MLX_BLAS": "0"})
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert "\n" not in message and "reference BLAS (libblas-" in message
    assert "unset FASTVLM_MLX_BLAS" in message or "apt install libopenblas0-pthread" in message, message
    assert result["loaded"] is None and result["kernel_sgemm"] is None
    assert "libblas-" in result["bound"]


def test_the_warning_names_the_install_when_no_optimized_blas_is_found(tmp_path):
    """Without any optimized BLAS on the machine, the one line says how to get one."""
    if not bundled_blas():
        pytest.skip("this MLX build bundles no reference BLAS")
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('b', sys.argv[1]); b = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(b); b.candidates = lambda: []\n"
        "b.load_fast_blas(); import mlx.core\n"
        "print(b.slow_blas_message())\n"
    )
    message = run_with_blas_module(script).splitlines()[-1]
    assert message.startswith("MLX uses a reference BLAS (libblas-")
    assert 'apt install libopenblas0-pthread, or pip install "fastvlm-mlx[fast-cpu]"' in message


@pytest.mark.parametrize("preload", [False, True])
def test_bound_library_agrees_with_the_dynamic_loader(tmp_path, preload):
    """bound_library() reads MLX's cblas_sgemm slot; the loader's own report (LD_DEBUG=bindings) is the reference."""
    library = None
    if preload:
        found = [p for p in optimized_library_or_skip() if os.path.isabs(p) and "cmeel" not in p]
        if not found:
            pytest.skip("no system OpenBLAS or MKL to preload")
        library = found[0]
    script = (
        "import ctypes, importlib.util, sys\n"
        "if sys.argv[2]: ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)\n"
        "import mlx.core\n"
        "spec = importlib.util.spec_from_file_location('b', sys.argv[1]); b = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(b); print(b.bound_library())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVLM_MLX_BLAS", "LD_PRELOAD")}
    env.update(LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "fastvlm_mlx" / "cpu" / "blas.py"), library or ""],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld*"))
    targets = re.findall(r"binding file \S*mlx\S* \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'", log)
    assert targets, "the loader reported no cblas_sgemm binding for MLX"
    bound = proc.stdout.strip().splitlines()[-1]
    assert all(os.path.realpath(t) == bound for t in targets), (bound, targets)
    if preload:
        assert same_library(library, bound)


def test_a_blas_path_that_cannot_load_is_one_warning_line_at_load():
    """Said at model load, where a command has made warnings one line, not at import as Python's two-line form."""
    proc = run_cli(
        "fastvlm_mlx.generate",
        "-m",
        str(FIXTURES / "format_a"),
        "-p",
        "Hi.",
        "--max-tokens",
        "2",
        "--dtype",
        "float32",
        env={"FASTVLM_MLX_BLAS": "/nonexistent/libblas-missing.so"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: "), proc.stderr
    assert "FASTVLM_MLX_BLAS=/nonexistent/libblas-missing.so could not be loaded" in lines[0]
