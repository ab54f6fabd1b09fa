"""The package's C kernels (``pool.c``, ``skinny.c``, ``attention.c``, ``depthwise.c``, ``mlp.c``), compiled into one library on first use.

They are built with the machine's C compiler (the one ``mx.compile`` already needs on a CPU) into the user
cache, keyed by the sources, the flags and the CPU, and called through ctypes on the arrays' memory.  One
library, so that the kernels share one pool of worker threads (``pool.c``).
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("pool.c", "skinny.c", "attention.c", "depthwise.c", "mlp.c")]
HEADERS = [HERE / "native.h"]
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread"]
LIBRARIES = ["-lm"]
MAX_THREADS = 8  # beyond the memory's bandwidth for decoding, and plenty for the 2-16 cores of a Mac or PC

_library = None  # the loaded library, or the exception that building it raised


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if len(lines) >= 4:
                    break
    except OSError:
        pass
    return platform.machine() + "\n" + "\n".join(lines)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastvlm_mlx"


def library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.name.encode() + source.read_bytes())
    key.update(" ".join([compiler] + FLAGS + LIBRARIES).encode() + _cpu_identity().encode())
    return _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the sources once per machine; concurrent processes each write a temporary file and rename it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    path = library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{HERE}", *map(str, SOURCES), *LIBRARIES, "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library() -> ctypes.CDLL:
    """The compiled library; raises (the same error on every call) when it cannot be built."""
    global _library
    if _library is None:
        try:
            _library = ctypes.CDLL(str(build()))
        except Exception as e:  # noqa: BLE001 - kept, so that every caller gets the one reason
            _library = e
    if isinstance(_library, Exception):
        raise _library
    return _library


def function(name: str, argtypes: list):
    """The library's C function ``name``, typed with ``argtypes`` (returning void); raises as ``library``."""
    fn = getattr(library(), name)
    fn.argtypes = argtypes
    fn.restype = None
    return fn


def blas_kernel(name: str, argtypes: list):
    """(``function(name, argtypes)``, the address of the loaded BLAS's cblas_sgemm) for a kernel that calls
    the process's optimized BLAS (``blas.py``); None without one, or where the library cannot be built
    (``skinny.kernel`` warns about that once)."""
    from . import blas

    if blas.loaded is None:
        return None
    try:
        return function(name, argtypes), ctypes.cast(ctypes.CDLL(blas.loaded).cblas_sgemm, ctypes.c_void_p).value
    except Exception:  # noqa: BLE001 - MLX ops compute the same maths
        return None


def threads() -> int:
    """Threads for a kernel call: the cores this process may use, at most MAX_THREADS."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_THREADS))
