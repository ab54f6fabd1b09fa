"""The decoder's matmuls for a few rows (decoding: one row per sequence) at the memory's speed.

Decoding reads every decoder weight once per step, so its speed is the speed at which the matmul
streams the weights.  MLX's CPU matmul is BLAS sgemm, which packs the weight for a big GEMM: with
1-8 rows that streams the weights slower than ``skinny.c``, which reads each weight once
(``python -m benchmarks.decode_matmul`` measures both; figures in benchmarks/RESULTS.md).  It is compiled on first use
(``native``) and called through ctypes on the arrays' memory.  Each call splits the weight rows over the
persistent pool of threads of ``pool.c``: a decode step makes ~170 calls, and a thread started per call
cost more than the smaller products themselves.

A weight stored in bfloat16 (``cpu.decoder``: a bfloat16 checkpoint in a float32 model) is read as its raw 16 bits
and widened in the kernel, which is exact: half the bytes, so a decode step of a bfloat16 checkpoint streams half
as much.

Where it cannot be built (no compiler) the decoder warns once and keeps MLX's matmul (and attention MLX's ops).
Environment variable FASTVLM_MLX_SKINNY: ``0``/``off``/``false``/``no`` keeps MLX's matmul.
"""

import ctypes
import warnings

import mlx.core as mx
import numpy as np

from . import native
from .blas import switched_off

ENV_VAR = "FASTVLM_MLX_SKINNY"
MAX_ROWS = 8  # above this sgemm is as fast (the kernel keeps at most 8 rows of x per pass)


def enabled() -> bool:
    return not switched_off(ENV_VAR)


_kernels = None  # {NumPy dtype of the weight's memory: ctypes function} once built; {} once building failed or is off


def kernel():
    """The compiled kernel for float32 weights, or None (switched off, or it could not be built: warned once)."""
    return kernels().get(np.dtype(np.float32))


def kernels() -> dict:
    """The compiled kernels by the dtype of the weight's memory as ``weight_memory`` gives it: float32, and
    uint16 for bfloat16 weights (widened exactly as they are read); empty when they cannot run."""
    global _kernels
    if _kernels is None:
        _kernels = {}
        if enabled():
            try:
                args = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
                bf16 = native.function("skinny_matmul_bf16", args)
                bf16.restype = ctypes.c_int  # -1: no memory for x's rows rearranged
                _kernels = {np.dtype(np.float32): native.function("skinny_matmul", args), np.dtype(np.uint16): bf16}
            except Exception as e:  # noqa: BLE001 - a missing compiler must not stop the model
                warnings.warn(
                    f"fastvlm_mlx: decoding and attention use MLX's slower CPU ops: could not build the C kernels: {e}",
                    stacklevel=2,
                )
    return _kernels


def weight_memory(weight: mx.array) -> np.ndarray | None:
    """An evaluated weight's memory as a NumPy array without a copy: float32 as it is, bfloat16 as its raw
    16-bit patterns (NumPy has no bfloat16); None for other dtypes or a weight that is not C-contiguous."""
    if weight.dtype == mx.float32:
        w = np.asarray(weight)
        return w if w.flags.c_contiguous else None
    if weight.dtype == mx.bfloat16:
        view = memoryview(weight)
        return np.frombuffer(view, dtype=np.uint16).reshape(weight.shape) if view.c_contiguous else None
    return None


def matmul(x: mx.array, weight: mx.array) -> mx.array | None:
    """``x @ weight.T`` through the kernel for at most MAX_ROWS float32 rows on the CPU and a float32 or bfloat16
    weight; None where it does not apply (more rows, other dtypes or devices, a weight that is not contiguous,
    or inside mx.compile)."""
    k = x.shape[-1]
    rows = x.size // k if k else 0
    if not 0 < rows <= MAX_ROWS or x.dtype != mx.float32 or weight.dtype not in (mx.float32, mx.bfloat16):
        return None
    if mx.default_device() != mx.cpu or weight.ndim != 2 or weight.shape[1] != k:
        return None
    if kernel() is None:
        return None
    try:
        mx.eval(x, weight)
    except ValueError:  # being traced (mx.compile, vmap): no data to read
        return None
    w = weight_memory(weight)
    if w is None:
        return None
    y = rows_times(np.asarray(x).reshape(rows, k), w)
    return mx.array(y).reshape(*x.shape[:-1], w.shape[0])


def rows_times(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w.T`` through the kernel on NumPy arrays: x (rows, K) float32 with rows <= MAX_ROWS, w (N, K) as
    ``weight_memory`` gives it; the kernels must be built (``kernel()`` is not None)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k = x.shape
    n = w.shape[0]
    y = np.empty((rows, n), dtype=np.float32)
    if _kernels[w.dtype](x.ctypes.data, w.ctypes.data, y.ctypes.data, rows, n, k, native.threads()):
        raise MemoryError(f"no memory for {rows} x {k} floats")
    return y
