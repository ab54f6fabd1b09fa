"""Exact GELU, the SiLU gate and softmax attention, written so that MLX's CPU backend runs them fast.

On the CPU, ``mx.compile`` fuses elementwise graphs into generated C++ loops that the compiler
vectorizes, but only when (a) every input is contiguous with the output's shape (a broadcast input
makes the loop strided and scalar), (b) no op in the loop is a branchy one such as ``maximum`` or
``minimum`` (their NaN checks keep the whole loop scalar) and (c) no path through the graph is more
than 11 ops deep (MLX's fusion limit; a deeper graph is cut into several kernels, some of them
strided).  MLX's own CPU ``erf`` and ``exp`` are scalar.  The functions
here keep to those rules: clamping uses ``abs``, polynomials use Estrin's scheme (depth log2 of the
degree instead of the degree), and each computation is cut by hand into kernels within the limit.

So GELU, the exponential and the decoder's SiLU gate run vectorized (benchmarks/RESULTS.md has the
figures).  All stay within a few 1e-7 relative of float64 results
(MLX's own exp: 4e-6).  GPUs and other dtypes keep MLX's own ops (``gelu``, ``swiglu`` and
``attention`` decide, through ``on_cpu_float32``).
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from .attention import blocked_attention


def _estrin(coeffs, u: mx.array) -> mx.array:
    """sum(c_i * u**i) for up to 8 ascending coefficients: 3 multiply-add tiers deep, where Horner needs one per
    degree."""
    if len(coeffs) > 8:
        raise ValueError("_estrin takes at most 8 coefficients")
    u2 = u * u
    u4 = u2 * u2
    pairs = [coeffs[i] + coeffs[i + 1] * u if i + 1 < len(coeffs) else coeffs[i] for i in range(0, len(coeffs), 2)]
    quads = [pairs[i] + pairs[i + 1] * u2 if i + 1 < len(pairs) else pairs[i] for i in range(0, len(pairs), 2)]
    return quads[0] + quads[1] * u4 if len(quads) > 1 else quads[0]


# ------------------------------------------------------------------------------------------ GELU
# GELU(x) = x * (1/2 + erf(x / sqrt 2) / 2), with erf(s) = s P(s^2) / Q(s^2) on s clamped to [-4, 4]
# (the rational form and coefficients of Eigen's float erf).  Written in w = 2 * clamp(x, -A, A) with
# A = 4 sqrt 2, so that the clamp needs no halving: x * (1/2 + w P~(w^2) / Q~(w^2)), where the
# substitution s^2 = w^2 / 8 and the factor 1 / (4 sqrt 2) are folded into the coefficients.
_ERF_P = (
    -1.60960333262415e-02,
    -2.95459980854025e-03,
    -7.34990630326855e-04,
    -5.69250639462346e-05,
    -2.10102402082508e-06,
    2.77068142495902e-08,
    -2.72614225801306e-10,
)  # ascending powers of s^2
_ERF_Q = (
    -1.42647390514189e-02,
    -7.37332916720468e-03,
    -1.68282697438203e-03,
    -2.13374055278905e-04,
    -1.45660718464996e-05,
)
_GELU_CLAMP = 4.0 * math.sqrt(2.0)
_GELU_P = tuple(c / 8.0**i / (4.0 * math.sqrt(2.0)) for i, c in enumerate(_ERF_P))
_GELU_Q = tuple(c / 8.0**i for i, c in enumerate(_ERF_Q))


@mx.compile
def _doubled_clamp(x: mx.array) -> mx.array:
    """2 * clip(x, -A, A) without maximum/minimum: |x + A| - |x - A|."""
    return mx.abs(x + _GELU_CLAMP) - mx.abs(x - _GELU_CLAMP)


@mx.compile
def _gelu_from_clamped(x: mx.array, w: mx.array) -> mx.array:
    u = w * w
    return x * (0.5 + w * _estrin(_GELU_P, u) / _estrin(_GELU_Q, u))


def gelu_exact(x: mx.array) -> mx.array:
    """Exact (erf) GELU in two vectorized kernels; within 1e-7 relative of ``nn.gelu`` (float32)."""
    return _gelu_from_clamped(x, _doubled_clamp(x))


def gelu(x: mx.array) -> mx.array:
    """Exact GELU: ``nn.gelu`` on a GPU and for non-float32 arrays, ``gelu_exact`` on the CPU."""
    if not on_cpu_float32(x):
        return nn.gelu(x)
    return gelu_exact(x)


# ----------------------------------------------------------------------------------- exponential
# exp(y) for y <= 0: y clamped at -64 (see below), n = round(y / ln 2) by the
# 1.5 * 2^23 rounding trick, f = y - n ln 2 in two parts (Cody-Waite, so f is exact), exp(f) by a
# degree-6 fit on [-ln2/2, ln2/2] (relative error 2e-9), and 2^n from its exponent bits.  Bit
# reinterpretation is not fusable, so this is two kernels: range reduction, then polynomial * 2^n.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # LN2_HI has 9 significant bits: n * LN2_HI is exact
_ROUND = 12582912.0  # 1.5 * 2^23: (t + _ROUND) - _ROUND rounds t to the nearest integer in float32
# exp(-64) = 1.6e-28 is nothing beside a softmax row sum of at least 1, and unlike exp(-87) = 1.6e-38
# its products with ordinary values stay normal floats: denormal arithmetic would slow the following
# matmul down.
_EXP_FLOOR = -64.0
_EXP_POLY = (
    1.000000000592,
    1.000000036134,
    0.4999999149164,
    0.1666642079678,
    0.04166835815592,
    0.008374774507024,
    0.001382942431378,
)  # fit minimizing the relative error at Chebyshev nodes


def _reduce_range(doubled: mx.array):
    """From 2 * max(y, floor): f = y - n ln 2 and the float32 bits of 2^n."""
    n = (doubled * (0.5 * _LOG2E) + _ROUND) - _ROUND
    f = (doubled * 0.5 - n * _LN2_HI) - n * _LN2_LO
    exponent_bits = mx.left_shift(n.astype(mx.int32) + 127, 23)
    return f, exponent_bits


@mx.compile
def _exp_range_reduce(y: mx.array):
    r = _EXP_FLOOR - y
    return _reduce_range((y + y) + (r + mx.abs(r)))  # 2 * max(y, floor), exact for y above the floor


@mx.compile
def _exp_minus_abs_range_reduce(x: mx.array):
    a = mx.abs(x) + _EXP_FLOOR
    return _reduce_range((a + mx.abs(a)) - 2 * mx.abs(x))  # 2 * max(-|x|, floor)


@mx.compile
def _exp_reconstruct(f: mx.array, two_to_n: mx.array) -> mx.array:
    return _estrin(_EXP_POLY, f) * two_to_n


def exp_nonpositive(y: mx.array) -> mx.array:
    """exp(y) for float32 y <= 0 in two vectorized kernels: ~1e-7 relative error; exp(-64) for y below -64."""
    f, exponent_bits = _exp_range_reduce(y)
    return _exp_reconstruct(f, exponent_bits.view(mx.float32))


# ---------------------------------------------------------------------------------- SiLU gate
# silu(g) = g sigmoid(g), and sigmoid(g) = (1 if g >= 0 else t) / (1 + t) with t = exp(-|g|) <= 1:
# no overflow, and relative accuracy in both tails.  The numerator is picked arithmetically (a
# select would keep the loop scalar): (|g| - g) / (2|g| + 1e-30) is exactly 1.0 for g < 0 and 0.0
# for g >= 0 (for |g| < 1e-22 it may fall in between, where t = 1 and both choices agree).
@mx.compile
def _swiglu_combine(gate: mx.array, x: mx.array, t: mx.array) -> mx.array:
    negative = (mx.abs(gate) - gate) / (2.0 * mx.abs(gate) + 1e-30)
    return gate * ((negative * t + (1.0 - negative)) / (1.0 + t)) * x


def swiglu_cpu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, the Qwen2 MLP gate, in three vectorized kernels."""
    f, exponent_bits = _exp_minus_abs_range_reduce(gate)
    return _swiglu_combine(gate, x, _exp_reconstruct(f, exponent_bits.view(mx.float32)))


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x: mlx-lm's compiled op on a GPU and for non-float32 arrays, ``swiglu_cpu`` on the CPU."""
    if not on_cpu_float32(gate):
        return mlx_lm_swiglu(gate, x)
    return swiglu_cpu(gate, x)


def attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
    """softmax(q k^T * scale) v with the vectorized exponential; the row sums divide the small output.

    q is (B, heads, L, D); k and v may have fewer heads (grouped-query attention: each k/v head
    serves heads / kv_heads consecutive query heads).  ``causal`` masks as mx.fast's "causal": query i
    sees keys up to i + S - L (the queries are the last L of the S positions).
    """
    b, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q = (q * scale).reshape(b, kv_heads, group * length, dim)  # a group's query heads share one k/v head
    scores = q @ k.swapaxes(-1, -2)
    if causal:
        hidden = mx.arange(keys)[None] > mx.arange(keys - length, keys)[:, None]  # (L, S)
        # -1e9 rather than -inf (inf - inf is NaN); the exponential clamps it to 1.6e-28, which
        # vanishes when added to the row sum of at least 1.
        scores = (scores.reshape(b, kv_heads, group, length, keys) + mx.where(hidden, -1e9, 0.0)).reshape(scores.shape)
    weights = exp_nonpositive(scores - mx.max(scores, axis=-1, keepdims=True))
    out = (weights @ v) / mx.sum(weights, axis=-1, keepdims=True)
    return out.reshape(b, heads, length, -1)


def on_cpu_float32(x: mx.array) -> bool:
    """Whether this module's CPU formulations apply (elsewhere MLX's own ops are used)."""
    return mx.default_device() == mx.cpu and x.dtype == mx.float32


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
    """Scaled dot-product attention over (B, heads, N, head_dim): MLX's fused op except float32 on the CPU,
    where ``attention.c`` computes it (``attention_cpu`` where that cannot run)."""
    if not on_cpu_float32(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    out = blocked_attention(q, k, v, scale, causal)
    return attention_cpu(q, k, v, scale, causal) if out is None else out
