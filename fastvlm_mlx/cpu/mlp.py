"""The tower's pointwise MLP and residual through ``mlp.c``: ``residual + scale * fc2(gelu(fc1(x)))``.

It is the second half of every RepMixer block and ConvFFN of FastViTHD.  ``mlp.c`` keeps the hidden
activations (4x the block's width) in the cores' caches and applies the GELU there, on every core, where
MLX's ops write them to memory and back twice and run the GELU on one thread.  Like ``attention.c`` it
calls the process's optimized BLAS; without one (or without a C compiler) ``fused_mlp`` returns None and
the caller computes the same maths with MLX ops.
"""

import ctypes

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas, native

_kernel = None  # (the ctypes function, the sgemm address), or False where it cannot run


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = native.blas_kernel("pointwise_mlp_f32", [ctypes.c_void_p] * 9 + [ctypes.c_int] * 6) or False
    return _kernel or None


def _pointer(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def fused_mlp(
    x: mx.array, residual: mx.array, fc1: nn.Linear, fc2: nn.Linear, scale: mx.array, channels_last: bool
) -> mx.array | None:
    """``residual + scale * fc2(gelu(fc1(x)))`` over the channel axis of float32 (B, C, H, W) arrays, or of
    (B, H, W, C) ones with ``channels_last``; None where the kernel cannot run."""
    found = kernel()
    if found is None or x.dtype != mx.float32 or residual.dtype != mx.float32:
        return None
    fn, sgemm = found
    params = [fc1.weight, fc2.weight, scale] + [layer.bias for layer in (fc1, fc2) if "bias" in layer]
    try:
        mx.eval(x, residual, *params)
    except ValueError:  # being traced (mx.compile, vmap): no data to read
        return None
    if any(p.dtype != mx.float32 for p in params):
        return None
    b = x.shape[0]
    c = x.shape[-1] if channels_last else x.shape[1]
    xs, rs, w1, w2, s = (np.ascontiguousarray(np.asarray(a)) for a in (x, residual, fc1.weight, fc2.weight, scale))
    b1, b2 = (np.ascontiguousarray(np.asarray(layer.bias)) if "bias" in layer else None for layer in (fc1, fc2))
    out = np.empty_like(rs)
    with blas.blas_threads(1):  # the kernel's threads are the parallelism
        fn(
            sgemm,
            xs.ctypes.data,
            rs.ctypes.data,
            w1.ctypes.data,
            _pointer(b1),
            w2.ctypes.data,
            _pointer(b2),
            s.ctypes.data,
            out.ctypes.data,
            b,
            c,
            w1.shape[0],
            x.size // (b * c),
            int(channels_last),
            native.threads(),
        )
    return mx.array(out)
