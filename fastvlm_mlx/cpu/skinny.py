"""The decoder's matmuls for a few rows (decoding: one row per sequence) at the memory's speed.

Decoding reads every decoder weight once per step, so its speed is the speed at which the matmul
streams the weights.  MLX's CPU matmul is BLAS sgemm, which packs the weight for a big GEMM: with
1-8 rows it streamed 8.7-10.4 GB/s on a 2-core Zen 4, where ``skinny.c``, which reads each weight
once, streamed 10.3-16.1 GB/s (``python -m benchmarks.decode_matmul``, benchmarks/RESULTS.md
session 6: a 0.5B step's matmuls 1.54x faster at 1 row, 1.19x at 4, 1.41x at 8; session 7, on a 2-core
Xeon: 2.3x, 2.3x and 1.9x, and level with PyTorch's MKL at 1 row).  It is compiled on first use with the machine's
C compiler (the one ``mx.compile`` already needs on a CPU) into the user cache, keyed by the
source, the flags and the CPU, and called through ctypes on the arrays' memory.  Each call splits the weight
rows over a persistent pool of threads in ``skinny.c``: a decode step makes ~170 calls, and a thread started
per call cost more than the smaller products themselves.

Where it cannot be built (no compiler) the decoder warns once and keeps MLX's matmul.
Environment variable FASTVLM_MLX_SKINNY: ``0``/``off``/``false``/``no`` keeps MLX's matmul.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .blas import switched_off

ENV_VAR = "FASTVLM_MLX_SKINNY"
MAX_ROWS = 8  # above this sgemm is as fast (the kernel keeps at most 8 rows of x per pass)
SOURCE = Path(__file__).with_name("skinny.c")
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread"]
MAX_THREADS = 8  # the memory bandwidth is reached well before this

_kernel = None  # the ctypes function once built; False once building failed or is switched off


def enabled() -> bool:
    return not switched_off(ENV_VAR)


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
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler] + FLAGS).encode() + _cpu_identity().encode())
    return _cache_dir() / f"skinny-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile skinny.c once per machine; concurrent processes each write a temporary file and rename it."""
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
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def kernel():
    """The compiled kernel, or None (switched off, or it could not be built: warned once)."""
    global _kernel
    if _kernel is None:
        _kernel = False
        if enabled():
            try:
                fn = ctypes.CDLL(str(build())).skinny_matmul
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
                fn.restype = None
                _kernel = fn
            except Exception as e:  # noqa: BLE001 - a missing compiler must not stop the model
                warnings.warn(f"fastvlm_mlx: decoding uses MLX's slower CPU matmul: could not build {SOURCE.name}: {e}",
                              stacklevel=2)
    return _kernel or None


def _threads() -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_THREADS))


def matmul(x: mx.array, weight: mx.array) -> Optional[mx.array]:
    """``x @ weight.T`` through the kernel for at most MAX_ROWS float32 rows on the CPU; None where it does not
    apply (more rows, other dtypes or devices, a weight that is not contiguous, or inside mx.compile)."""
    k = x.shape[-1]
    rows = x.size // k if k else 0
    if not 0 < rows <= MAX_ROWS or x.dtype != mx.float32 or weight.dtype != mx.float32:
        return None
    if mx.default_device() != mx.cpu or weight.ndim != 2 or weight.shape[1] != k:
        return None
    fn = kernel()
    if fn is None:
        return None
    try:
        mx.eval(x, weight)
    except ValueError:  # being traced (mx.compile, vmap): no data to read
        return None
    w = np.asarray(weight)
    if not w.flags.c_contiguous:
        return None
    xs = np.ascontiguousarray(np.asarray(x).reshape(rows, k))
    n = w.shape[0]
    y = np.empty((rows, n), dtype=np.float32)
    fn(xs.ctypes.data, w.ctypes.data, y.ctypes.data, rows, n, k, _threads())
    return mx.array(y).reshape(*x.shape[:-1], n)
