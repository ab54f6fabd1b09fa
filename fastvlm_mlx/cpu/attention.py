"""Softmax attention through ``attention.c``: a block of query rows at a time, in the cores' caches, and
the one new position of a decode step.

For the tower's stage 3 (24 heads, 1024 positions) MLX's CPU ops make ~10 passes over a 100 MB score
array, mostly single-threaded; ``attention.c`` never writes that array out.  It needs the process's
optimized BLAS (``blas.py``) for its two sgemm calls per block; without one (or without a C compiler)
``blocked_attention`` returns None and ``formulas.attention_cpu`` computes the same maths with MLX ops.

A decode step's attention (``one_position``, for ``cpu.decoder``) is a few thousand multiply-adds a layer,
which through MLX's CPU ops costs mostly scheduling and waiting; the kernel reads the KV cache's memory as it is and
needs no BLAS.
"""

import ctypes

import mlx.core as mx
import numpy as np

from . import blas, native

_kernel = None  # (the ctypes function, the sgemm address), or False where it cannot run


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = (
            native.blas_kernel(
                "attention_f32", [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_int] * 2
            )
            or False
        )
    return _kernel or None


_one_position = None  # the ctypes function, or False where it cannot be built


def one_position_kernel():
    global _one_position
    if _one_position is None:
        pointer, size, number = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        try:
            _one_position = native.function(
                "decode_attention_f32",
                [pointer] * 5
                + [size] * 2
                + [number]
                + [pointer] * 2
                + [number]
                + [pointer] * 3
                + [number] * 4
                + [ctypes.c_float, number],
            )
        except Exception:  # noqa: BLE001 - MLX's ops compute the same maths (skinny.kernel warns once)
            _one_position = False
    return _one_position or None


def one_position(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cache_keys: mx.array,
    cache_values: mx.array,
    cached: int,
    positions: np.ndarray,
    inv_freq: np.ndarray,
    keep: np.ndarray | None,
    scale: float,
) -> tuple | None:
    """A decode step's attention: q (B, H, D), k and v (B, G, D) float32, the new position's projections before
    the rope; the cache's (B, G, capacity, D) key and value buffers holding ``cached`` positions; each sequence's
    position (B,); the rope's frequencies (it rotates the first 2 * len(inv_freq) dimensions, halves as in
    Qwen2); keep (B, cached + 1) booleans or None. Returns (out (B, H * D), the roped key (B, G, D)), or None
    where the kernel or the cache's layout does not fit."""
    fn = one_position_kernel()
    if fn is None:
        return None
    keys, values = np.asarray(cache_keys), np.asarray(cache_values)  # waits for the cache's last update
    b, heads, dim = q.shape
    row = dim * 4
    if keys.dtype != np.float32 or keys.strides != values.strides or keys.strides[2:] != (row, 4):
        return None
    if keys.shape[:2] != (b, k.shape[1]) or keys.shape[2] < cached or keys.shape[3] != dim:
        return None
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    positions = np.ascontiguousarray(positions, dtype=np.float32)
    inv_freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
    keep = None if keep is None else np.ascontiguousarray(keep, dtype=np.uint8)
    out, k_roped = np.empty_like(q), np.empty_like(k)
    fn(
        q.ctypes.data,
        k.ctypes.data,
        v.ctypes.data,
        keys.ctypes.data,
        values.ctypes.data,
        keys.strides[0] // 4,
        keys.strides[1] // 4,
        cached,
        positions.ctypes.data,
        inv_freq.ctypes.data,
        len(inv_freq),
        None if keep is None else keep.ctypes.data,
        k_roped.ctypes.data,
        out.ctypes.data,
        b,
        heads,
        k.shape[1],
        dim,
        scale,
        native.threads(),
    )
    return out.reshape(b, heads * dim), k_roped


def blocked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array | None:
    """``formulas.attention_cpu``'s result for float32 (B, heads, L, D) q and (B, kv_heads, S, D) k, v, or
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
        fn(
            sgemm,
            qs.ctypes.data,
            ks.ctypes.data,
            vs.ctypes.data,
            out.ctypes.data,
            b * kv_heads,
            group * length,
            length,
            keys,
            dim,
            scale,
            int(causal),
            native.threads(),
        )
    return mx.array(out)
