"""Softmax attention through ``attention.c``: a block of query rows at a time, in the cores' caches.

For the tower's stage 3 (24 heads, 1024 positions) MLX's CPU ops make ~10 passes over a 100 MB score
array, mostly single-threaded; ``attention.c`` never writes that array out.  It needs the process's
optimized BLAS (``blas.py``) for its two sgemm calls per block; without one (or without a C compiler)
``blocked_attention`` returns None and ``kernels.attention_cpu`` computes the same maths with MLX ops.
"""

import ctypes
from typing import Optional

import mlx.core as mx
import numpy as np

from . import blas, native

_kernel = None  # (the ctypes function, the sgemm address), or False where it cannot run


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = native.blas_kernel("attention_f32", [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_int] * 2) or False
    return _kernel or None


def blocked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> Optional[mx.array]:
    """``kernels.attention_cpu``'s result for float32 (B, heads, L, D) q and (B, kv_heads, S, D) k, v, or
    None where the kernel cannot run (no compiler or BLAS, or inside mx.compile)."""
    found = kernel()
    if found is None:
        return None
    fn, sgemm = found
    try:
        mx.eval(q, k, v)
    except ValueError:  # being traced (mx.compile, vmap): no data to read
        return None
    b, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads  # a k/v head's query heads are consecutive: (B, kv_heads, group * L, D)
    qs, ks, vs = (np.ascontiguousarray(np.asarray(a), dtype=np.float32) for a in (q, k, v))
    out = np.empty_like(qs)
    with blas.blas_threads(1):  # the kernel's threads are the parallelism
        fn(sgemm, qs.ctypes.data, ks.ctypes.data, vs.ctypes.data, out.ctypes.data, b * kv_heads, group * length,
           length, keys, dim, scale, int(causal), native.threads())
    return mx.array(out)
