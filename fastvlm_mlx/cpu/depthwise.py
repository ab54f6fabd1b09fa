"""Depthwise convs on the CPU, where MLX's grouped conv is slow (benchmarks/RESULTS.md has the figures).

``depthwise_conv2d`` is the one entry point.  The default is the compiled ``depthwise.c`` (channels-first,
the direct multiply-adds from a padded copy in the core's cache, the fastest path at the tower's shapes);
where it cannot be built, and for other dtypes, the Toeplitz BLAS matmuls.
``FASTVLM_MLX_DEPTHWISE=compiled|native|shift|toeplitz`` forces a path (for tests and benchmarks).
"""

import ctypes
import os
from functools import cache

import mlx.core as mx
import numpy as np

from . import native


def _depthwise_native(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """MLX's grouped conv (NHWC): the right choice on Metal/CUDA, but slow on the CPU."""
    pad = weight.shape[1] // 2
    return mx.conv2d(x, weight, stride=stride, padding=pad, groups=x.shape[-1])


def _depthwise_shift(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Sum of k*k shifted, per-channel-scaled slices of the padded NHWC input (exact; meant for mx.compile)."""
    b, h, w, c = x.shape
    cm, k = weight.shape[0], weight.shape[1]
    m, p = cm // c, k // 2
    if m > 1:
        x = mx.repeat(x, m, axis=-1)  # output channel c*m + r reads input channel c
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    taps = weight.reshape(cm, k * k).T  # (k*k, C*m)
    out = None
    for i in range(k):
        for j in range(k):
            win = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            term = win * taps[i * k + j]
            out = term if out is None else out + term
    return out


def _toeplitz_tile(stride: int, out_width: int) -> int:
    """Output columns per matmul row: the width that ran fastest at FastViTHD's shapes (NCHW), 16 for stride-1
    convs over 64-128 columns and 8 elsewhere.  A wider tile makes fewer, larger matmuls but wastes more of
    their multiply-adds on the band's zeros."""
    return 16 if stride == 1 and 64 <= out_width <= 128 else 8


@cache
def _toeplitz_pattern(k: int, tile: int, stride: int):
    """Which kernel column feeds (input column a, output column t) of one tile, and whether any does."""
    span = stride * (tile - 1) + k
    col = np.arange(span)[:, None] - stride * np.arange(tile)[None, :]
    valid = (col >= 0) & (col < k)
    return np.where(valid, col, 0).reshape(-1).astype(np.int32), valid


def _toeplitz_weights(weight: mx.array, channels: int, tile: int, stride: int) -> mx.array:
    """(C*m, k, k, 1) -> (C, k, span, m*tile): per channel and kernel row, the banded matrix of one row tile."""
    cm, k = weight.shape[0], weight.shape[1]
    m = cm // channels
    span = stride * (tile - 1) + k
    index, valid = _toeplitz_pattern(k, tile, stride)
    w = weight.reshape(channels, m, k, k)
    band = mx.take(w, mx.array(index), axis=3).reshape(channels, m, k, span, tile)
    band = mx.where(mx.array(valid), band, mx.zeros((), dtype=weight.dtype))
    return band.transpose(0, 2, 3, 1, 4).reshape(channels, k, span, m * tile)


def _depthwise_toeplitz(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Depthwise conv of an NCHW input as k batched matmuls, one batch entry per channel (the CPU path).

    Each output row is cut into tiles of T columns; a tile is (input tile of s*(T-1)+k columns) @ (banded
    Toeplitz matrix of one kernel row), and the k kernel rows are k row-shifted views of the same gathered
    tiles, accumulated with addmm.  The matmuls do (s*(T-1)+k)/k times the direct FLOPs (2x at k=7, T=8)
    but run in BLAS, far faster than MLX's CPU grouped conv.  Same sums, different order: agrees with
    mx.conv2d to a few 1e-7 relative.
    """
    b, c, h, w = x.shape
    cm, k = weight.shape[0], weight.shape[1]
    m, p, s = cm // c, k // 2, stride
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    t = _toeplitz_tile(s, wo)
    tiles = -(-wo // t)
    span = s * (t - 1) + k
    wp = s * t * (tiles - 1) + span  # padded width the tiles read
    hp = -(-(h + 2 * p) // s) * s  # padded height, a multiple of the stride
    right = wp - w - p
    if right < 0:  # trailing input columns no output reads
        x, right = x[..., : w + right], 0
    xp = mx.pad(x, [(0, 0), (0, 0), (p, hp - h - p), (p, right)])  # (B, C, hp, wp)
    bands = _toeplitz_weights(weight, c, t, s)  # (C, k, span, m*T)
    if b > 1:
        bands = mx.broadcast_to(bands[None], (b,) + bands.shape).reshape((b * c,) + bands.shape[1:])
    rows = hp // s
    # One gathered copy per row phase (stride 2 reads even and odd padded rows separately).
    phases = [
        mx.contiguous(mx.as_strided(xp, (b, c, rows, tiles, span), (c * hp * wp, hp * wp, s * wp, s * t, 1), ph * wp))
        for ph in range(s)
    ]
    out = None
    for i in range(k):
        r0 = i // s
        a = phases[i % s][:, :, r0 : r0 + ho].reshape(b * c, ho * tiles, span)
        out = a @ bands[:, i] if out is None else mx.addmm(out, a, bands[:, i])
    if m == 1:
        out = out.reshape(b, c, ho, tiles * t)
    else:  # the m output channels of input channel c are interleaved per tile: (c, row, tile, r, t) -> (c*m + r, ...)
        out = out.reshape(b, c, ho, tiles, m, t).transpose(0, 1, 4, 2, 3, 5).reshape(b, cm, ho, tiles * t)
    return out[..., :wo] if tiles * t != wo else out


_compiled = None  # the ctypes function of depthwise.c, or False where it cannot be built


def compiled_kernel():
    """depthwise.c's function, or None where the C kernels cannot be built (``skinny.kernel`` says why, once)."""
    global _compiled
    if _compiled is None:
        try:
            _compiled = native.function("depthwise_f32", [ctypes.c_void_p] * 4 + [ctypes.c_int] * 8)
        except Exception:  # noqa: BLE001 - a missing compiler leaves the Toeplitz path
            _compiled = False
    return _compiled or None


def _depthwise_compiled(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Depthwise conv of an NCHW float32 input by ``depthwise.c``; other dtypes (and traced calls) take the
    Toeplitz path."""
    fn = compiled_kernel()
    if fn is None or x.dtype != mx.float32 or weight.dtype != mx.float32:
        return _toeplitz_compiled(x, weight, stride)
    try:
        mx.eval(x, weight)
    except ValueError:  # being traced (mx.compile, vmap): no data to read
        return _toeplitz_compiled(x, weight, stride)
    b, c, h, w = x.shape
    cm, k = weight.shape[0], weight.shape[1]
    p = k // 2
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xs = np.ascontiguousarray(np.asarray(x))
    ws = np.ascontiguousarray(np.asarray(weight))
    out = np.empty((b, cm, ho, wo), dtype=np.float32)
    fn(xs.ctypes.data, ws.ctypes.data, None, out.ctypes.data, b * c, c, cm // c, h, w, k, stride, native.threads())
    return mx.array(out)


_toeplitz_compiled = mx.compile(_depthwise_toeplitz)

# Each path with the layout it computes in (True: NCHW).
_DEPTHWISE_IMPLS = {
    "compiled": (_depthwise_compiled, True),
    "native": (_depthwise_native, False),
    "shift": (mx.compile(_depthwise_shift), False),
    "toeplitz": (_toeplitz_compiled, True),
}

# FASTVLM_MLX_DEPTHWISE=compiled|native|shift|toeplitz forces one path (for tests and benchmarks).
_DEPTHWISE_ENV = "FASTVLM_MLX_DEPTHWISE"


def depthwise_impl() -> str:
    """The depthwise-conv path used now: depthwise.c (the Toeplitz matmuls where it cannot be built) unless
    FASTVLM_MLX_DEPTHWISE forces another."""
    forced = os.environ.get(_DEPTHWISE_ENV, "").strip().lower()
    if forced in _DEPTHWISE_IMPLS:
        return forced
    return "compiled" if compiled_kernel() is not None else "toeplitz"


def computes_channels_first() -> bool:
    """Whether the depthwise path used now computes in NCHW (then the conv stages run channels-first)."""
    return _DEPTHWISE_IMPLS[depthwise_impl()][1]


def to_channels_first(x: mx.array) -> mx.array:
    return x.transpose(0, 3, 1, 2)


def to_channels_last(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


def depthwise_conv2d(
    x: mx.array, weight: mx.array, stride: int = 1, channels_first: bool = False, impl: str | None = None
) -> mx.array:
    """Grouped conv with one group per input channel ('same' padding, odd kernel), in x's layout.

    ``weight`` is (C * multiplier, k, k, 1).  Every depthwise conv of the tower goes through here, so the
    formulation is chosen in this one place (see ``depthwise_impl``); ``impl`` forces one.
    A path computing in the other layout gets x transposed there and back.
    """
    fn, impl_channels_first = _DEPTHWISE_IMPLS[impl or depthwise_impl()]
    if impl_channels_first == channels_first:
        return fn(x, weight, stride)
    if channels_first:
        return to_channels_first(fn(to_channels_last(x), weight, stride))
    return to_channels_last(fn(to_channels_first(x), weight, stride))
