"""Make MLX's Linux CPU build use an optimized BLAS.

The Linux CPU wheel of MLX (mlx-cpu) links against the bundled reference BLAS, which runs an fp32
matmul at about 5 GFLOP/s; OpenBLAS or MKL run the same matmul 30-40x faster.  A library loaded with
RTLD_GLOBAL *before* mlx.core is first imported is searched before mlx's own dependencies, so its
cblas_sgemm (and LAPACK) symbols are the ones MLX binds to.  This has to happen before the first
`import mlx.core` anywhere in the process, which is why the package calls `load_fast_blas()` first.

Environment variable FASTVLM_MLX_BLAS: `0`, `off`, `none` or `false` loads nothing; a path loads that
library (and nothing else); anything else (or unset) searches the usual places.
"""

import contextlib
import ctypes
import ctypes.util
import os
import platform
import site
import sys
import warnings

ENV_VAR = "FASTVLM_MLX_BLAS"

# The library that load_fast_blas() loaded (as passed to dlopen), or None; for --verbose and benchmarks.
loaded = None

# Whether mlx.core had been imported before the package (so MLX kept its own BLAS); warned of at model load.
imported_too_late = False

# Values of an on/off environment variable (this one and FASTVLM_MLX_MALLOC) that mean off.
OFF_VALUES = {"0", "off", "none", "false", "no"}


def switched_off(variable: str) -> bool:
    """Whether an on/off environment variable of the package is set to one of OFF_VALUES."""
    return os.environ.get(variable, "").strip().lower() in OFF_VALUES
_done = False


def _openblas_candidates():
    """Debian/Ubuntu paths (the alternatives symlink first, then each threading variant), then ld.so.cache."""
    libdir = f"/usr/lib/{platform.machine()}-linux-gnu"
    paths = [f"{libdir}/libopenblas.so.0"]
    paths += [f"{libdir}/openblas-{variant}/libopenblas.so.0" for variant in ("pthread", "openmp", "serial")]
    paths += ["/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0"]  # Fedora, Arch
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    # The cmeel-openblas wheel (pip); it needs the system's libgfortran.so.5 and is skipped without it.
    for sp in _site_dirs():
        paths.append(os.path.join(sp, "cmeel.prefix", "lib", "libopenblas.so.0"))
    return paths


def _mkl_candidates():
    """The `mkl` wheel puts libmkl_rt into <prefix>/lib (.so.3 since 2025, .so.2 before)."""
    prefixes = [sys.prefix, site.USER_BASE or ""]
    paths = [os.path.join(p, "lib", f"libmkl_rt.so.{v}") for p in prefixes if p for v in (3, 2)]
    found = ctypes.util.find_library("mkl_rt")
    if found:
        paths.append(found)
    return paths


def _site_dirs():
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and site.USER_SITE:
        dirs.append(site.USER_SITE)
    return dirs


def candidates():
    """Libraries to try, best first: OpenBLAS measured as fast as MKL (and is far smaller), so it comes first."""
    seen, result = set(), []
    for path in _openblas_candidates() + _mkl_candidates():
        # Bare sonames from find_library are kept; absolute paths must exist.
        if path not in seen and (not os.path.isabs(path) or os.path.exists(path)):
            seen.add(path)
            result.append(path)
    return result


def _try_load(path):
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cblas_sgemm  # a library without cblas would not replace anything
    except (OSError, AttributeError):
        return False
    return True


def load_fast_blas():
    """Load an optimized BLAS into the global symbol scope; return its path, or None.

    Never raises.  Does nothing off Linux (macOS MLX uses Accelerate/Metal), when disabled by
    FASTVLM_MLX_BLAS, or when mlx.core is already imported (its symbols are bound by then).
    Calling it again returns the first call's result.
    """
    global loaded, _done, imported_too_late
    if _done:
        return loaded
    _done = True
    try:
        choice = os.environ.get(ENV_VAR, "").strip()
        if not sys.platform.startswith("linux") or choice.lower() in OFF_VALUES:
            return None
        if "mlx.core" in sys.modules:
            imported_too_late = bool(candidates())  # importing the package first would have helped
            return None
        if os.sep in choice or choice.startswith("lib"):
            if _try_load(choice):
                loaded = choice
            else:
                warnings.warn(f"{ENV_VAR}={choice}: could not load it as a BLAS library; using MLX's own BLAS")
            return loaded
        for path in candidates():
            if _try_load(path):
                loaded = path
                break
    except Exception:  # noqa: BLE001 - an import-time helper must never break the package import
        loaded = None
    return loaded


def _thread_controls():
    """(get, set) for the loaded library's thread count, or None when it has no such calls (or none is loaded)."""
    if loaded is None:
        return None
    try:
        lib = ctypes.CDLL(loaded)
    except OSError:
        return None
    for get, set_ in (("openblas_get_num_threads", "openblas_set_num_threads"), ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")):
        if hasattr(lib, get) and hasattr(lib, set_):
            return getattr(lib, get), getattr(lib, set_)
    return None


@contextlib.contextmanager
def blas_threads(n: int):
    """BLAS calls that *run* inside this block use ``n`` threads (evaluate MLX arrays inside it).

    For work already split over two MLX CPU streams, one BLAS thread per stream avoids the two streams'
    matmuls contending for the same cores.  A no-op when the BLAS cannot be told (e.g. none was loaded).
    """
    controls = _thread_controls()
    if controls is None:
        yield
        return
    get, set_ = controls
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)


def describe() -> str:
    """The BLAS in use, for benchmark records: its path and, for OpenBLAS, the build and the kernels it
    runs (OPENBLAS_CORETYPE can force older ones: Haswell's run sgemm at half the speed of SkylakeX's)."""
    if loaded is None:
        return "MLX's bundled reference BLAS"
    try:
        lib = ctypes.CDLL(loaded)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return f"{loaded} ({lib.openblas_get_config().decode().strip()})"
    except (OSError, AttributeError):
        return loaded


def warn_if_imported_too_late() -> None:
    """A float32 model on the CPU without the fast BLAS runs its matmuls 20-40x slower: say why, once."""
    global imported_too_late
    if imported_too_late:
        imported_too_late = False
        warnings.warn("mlx.core was imported before fastvlm_mlx, so MLX keeps its reference BLAS and float32 "
                      "matmuls run 20-40x slower on this CPU: import fastvlm_mlx first", stacklevel=3)
