"""The CPU's fused GELU, exponential and attention against float64 math and MLX's own ops."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fastvlm_mlx.cpu import kernels as cpu_math


def _gelu64(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def test_gelu_matches_float64_erf_gelu():
    x = np.concatenate([np.linspace(-12, 12, 100001), np.random.default_rng(0).normal(0, 3, 10000)]).astype(np.float32)
    ref = _gelu64(x.astype(np.float64))
    out = np.array(cpu_math.gelu_exact(mx.array(x)), dtype=np.float64)
    err = np.abs(out - ref)
    assert err.max() < 2e-6  # at |x| ~ 12 that is a couple of float32 ulps
    # relative where |GELU| >= 1; in the far negative tail, where 1 + erf cancels, about 1e-6 absolute
    assert np.all(err <= 1e-6 * np.maximum(np.abs(ref), 1.0))
    assert np.all(err[np.abs(ref) >= 1] <= 3e-7 * np.abs(ref[np.abs(ref) >= 1]))  # nn.gelu: 1.8e-7
    # beyond the clamp the exact GELU is x (or 0) in float32
    assert np.array_equal(out[x > 6], x[x > 6].astype(np.float64))


def test_gelu_falls_back_to_mlx_for_other_dtypes():
    x = mx.random.normal((64,)).astype(mx.float16)
    assert cpu_math.gelu(x).dtype == mx.float16
    assert mx.array_equal(cpu_math.gelu(x), nn.gelu(x)).item()


def test_exp_matches_float64_exp():
    y = -np.linspace(0, 100, 400001).astype(np.float32)
    ref = np.exp(y.astype(np.float64))
    out = np.array(cpu_math.exp_nonpositive(mx.array(y)), dtype=np.float64)
    above = y > -64
    assert np.max(np.abs(out[above] - ref[above]) / ref[above]) < 3e-7  # MLX's own CPU exp: ~4e-6
    assert np.all(out[~above] <= 1.7e-28) and np.all(out > 0)  # clamped at exp(-64), never garbage
    assert out[0] == 1.0


def test_attention_matches_mlx_fused_attention():
    mx.random.seed(3)
    q, k, v = (mx.random.normal((2, 3, 50, 16)) * 3 for _ in range(3))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    out = cpu_math.attention_cpu(q, k, v, 0.25)
    assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-6
    # large logits must not overflow: the row maximum is subtracted first
    out = cpu_math.attention_cpu(q * 100, k, v, 0.25)
    assert mx.all(mx.isfinite(out)).item()


def test_causal_grouped_attention_matches_mlx():
    """Grouped-query heads, and queries that are the last L of S positions (a prefill after a cached prefix)."""
    mx.random.seed(4)
    q = mx.random.normal((1, 6, 7, 8)) * 2
    k, v = mx.random.normal((1, 2, 11, 8)) * 2, mx.random.normal((1, 2, 11, 8))
    for causal, mask in ((True, "causal"), (False, None)):
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        out = cpu_math.attention_cpu(q, k, v, 0.3, causal=causal)
        assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-6, mask


def test_decoder_layers_match_mlx_lm_with_a_cached_prefix():
    """The decoder's CPU attention and SiLU gate give mlx-lm's Qwen2 outputs, prefix cache included."""
    from mlx_lm.models import qwen2
    from mlx_lm.models.cache import make_prompt_cache

    from fastvlm_mlx.cpu.decoder import CpuAttention as DecoderAttention
    from fastvlm_mlx.cpu.decoder import CpuMLP as DecoderMLP

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=50)
    mx.random.seed(5)
    theirs = qwen2.Model(args)
    ours = qwen2.Model(args)
    for layer in ours.layers:
        layer.self_attn, layer.mlp = DecoderAttention(args), DecoderMLP(args.hidden_size, args.intermediate_size)
    ours.update(theirs.parameters())
    ids = mx.random.randint(0, 50, (1, 12))
    caches = [make_prompt_cache(m) for m in (theirs, ours)]
    for chunk in (ids[:, :5], ids[:, 5:11], ids[:, 11:]):  # prefix, then a multi-token step at offset 5, then decode
        ref, out = theirs(chunk, cache=caches[0]), ours(chunk, cache=caches[1])
        assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-5
