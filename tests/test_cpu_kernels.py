"""The CPU's fused GELU, exponential and attention against float64 math and MLX's own ops.

Device and dtype: the CPU, float32 unless a test names another.  Every test needs the CPU layer (Linux's CPU), and
those of the C kernels a C compiler too; they say so when they skip."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from precision import requires_c_kernels, requires_cpu_layer

from fastvlm_mlx.cpu import formulas as cpu_math

pytestmark = requires_cpu_layer


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


def _passes_in_threads(n: int, check) -> bool:
    """Whether ``check()`` returns True in each of n Python threads running at once (each given 60 s)."""
    import threading

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, check())) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results == {i: True for i in range(n)}


def _attention64(q, k, v, scale, causal):
    """softmax(q k^T scale) v in float64, grouped-query heads, causal as mx.fast's (the last L of S positions)."""
    q, k, v = (np.array(a, dtype=np.float64) for a in (q, k, v))
    group, length, keys = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    if causal:
        scores = np.where(np.arange(keys)[None] > np.arange(keys - length, keys)[:, None], -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


@requires_c_kernels
def test_blocked_attention_kernel_matches_float64_attention():
    """attention.c over several blocks of query rows and ragged tails: the tower's shape (24 heads of 32 over
    1024 positions), a grouped causal prefill after a cached prefix, odd sizes, logits large enough to overflow
    a naive exponential, and calls from several threads at once.  formulas.attention takes this path."""
    from fastvlm_mlx.cpu import blas
    from fastvlm_mlx.cpu.attention import blocked_attention

    if blas.loaded is None:
        import pytest

        pytest.skip(
            "attention.c calls the optimized BLAS, and none is installed (apt-get install libopenblas0-pthread)"
        )
    mx.random.seed(6)
    cases = [
        ((1, 24, 1024, 32), (1, 24, 1024, 32), False, 1.0),
        ((2, 14, 37, 64), (2, 2, 300, 64), True, 2.0),
        ((1, 3, 5, 17), (1, 3, 9, 17), False, 1.0),
        ((1, 6, 7, 8), (1, 2, 7, 8), True, 40.0),
    ]
    for q_shape, kv_shape, causal, size in cases:
        q, k, v = mx.random.normal(q_shape) * size, mx.random.normal(kv_shape), mx.random.normal(kv_shape)
        ref = _attention64(q, k, v, 0.3, causal)
        out = blocked_attention(q, k, v, 0.3, causal)
        assert out is not None and out.shape == q.shape
        assert np.abs(np.array(out) - ref).max() <= 3e-6 * np.abs(ref).max(), (q_shape, causal)
        assert (mx.abs(cpu_math.attention(q, k, v, 0.3, causal) - out).max() == 0).item()

    q, k, v = (mx.random.normal((1, 4, 300, 16)) for _ in range(3))
    ref = _attention64(q, k, v, 0.5, True)
    assert _passes_in_threads(
        3,
        lambda: all(
            np.abs(np.array(blocked_attention(q, k, v, 0.5, True)) - ref).max() <= 3e-6 * np.abs(ref).max()
            for _ in range(10)
        ),
    )


def _rope64(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary embedding of x (B, heads, D) in float64, halves rotated as Qwen2 does (transformers' rotate_half)."""
    half = len(inv_freq)
    angle = positions.astype(np.float64)[:, None, None] * inv_freq.astype(np.float64)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle), rest], -1)


@requires_c_kernels
@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim,rope_dims,cached",
    [(1, 14, 2, 64, 64, 300), (3, 6, 2, 40, 40, 37), (8, 14, 2, 64, 64, 5), (2, 4, 4, 24, 16, 0)],
)
def test_decode_step_attention_kernel_matches_float64(batch, heads, kv_heads, dim, rope_dims, cached):
    """attention.c's decode step (rope, then softmax attention of one new position over the cache and itself)
    against float64 maths: grouped heads, head sizes that are and are not multiples of 16, a rope over part of
    the head, positions up to 30000 (angles in double precision), left-padding masks, and the cache as MLX
    holds it (spare capacity, a buffer sliced past its first positions)."""
    from fastvlm_mlx.cpu.attention import one_position

    rng = np.random.default_rng(batch * 100 + cached)
    q = rng.normal(size=(batch, heads, dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, kv_heads, dim)).astype(np.float32) for _ in range(2))
    buffers = [mx.array(rng.normal(size=(batch, kv_heads, cached + 7 + 256, dim)).astype(np.float32)) for _ in range(2)]
    keys, values = (b[:, :, 7:] for b in buffers)  # as BatchKVCache.filter leaves them: a view past the start
    positions = rng.integers(0, 30000, size=batch).astype(np.float32)
    inv_freq = (1 / np.float32(1e6) ** (np.arange(0, rope_dims, 2, dtype=np.float32) / rope_dims)).astype(np.float32)
    keep = rng.random((batch, cached + 1)) < 0.8
    keep[:, -1] = True  # a position always sees itself
    for mask in (None, keep):
        found = one_position(q, k, v, keys, values, cached, positions, inv_freq, mask, 0.3)
        assert found is not None
        out, k_roped = found
        q64, k64 = (_rope64(a.astype(np.float64), positions, inv_freq) for a in (q, k))
        assert np.abs(k_roped - k64).max() <= 2e-6 * np.abs(k64).max()
        all_keys = np.concatenate([np.asarray(keys)[:, :, :cached], k64[:, :, None]], axis=2).astype(np.float64)
        all_values = np.concatenate([np.asarray(values)[:, :, :cached], v[:, :, None]], axis=2).astype(np.float64)
        group = heads // kv_heads
        scores = np.einsum("bgrd,bgtd->bgrt", q64.reshape(batch, kv_heads, group, dim) * 0.3, all_keys)
        if mask is not None:
            scores = np.where(mask[:, None, None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        ref = np.einsum("bgrt,bgtd->bgrd", weights / weights.sum(-1, keepdims=True), all_values).reshape(batch, -1)
        assert out.shape == (batch, heads * dim)
        assert np.abs(out - ref).max() <= 3e-6 * np.abs(ref).max(), (mask is None, np.abs(out - ref).max())


@requires_c_kernels
def test_fused_pointwise_mlp_matches_float64():
    """mlp.c's residual + scale * fc2(gelu(fc1(x))) in both layouts, over several blocks of positions with a
    ragged tail and a batch of 2, against float64 with the exact erf GELU; the tower takes this path."""
    from fastvlm_mlx.cpu import blas
    from fastvlm_mlx.cpu import vision as cpu_vision
    from fastvlm_mlx.cpu.mlp import fused_mlp

    if blas.loaded is None:
        import pytest

        pytest.skip("mlp.c calls the optimized BLAS, and none is installed (apt-get install libopenblas0-pthread)")
    erf = np.vectorize(math.erf)
    mx.random.seed(7)
    for batch, channels, hidden, side, channels_last in (
        (1, 24, 96, (9, 13), False),
        (2, 16, 64, (40, 41), False),
        (2, 48, 192, (5, 7), True),
        (1, 8, 2048, (3, 50), True),
    ):
        fc1, fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        scale = mx.random.normal((channels,))
        shape = (batch, *side, channels) if channels_last else (batch, channels, *side)
        x, residual = mx.random.normal(shape) * 3, mx.random.normal(shape)
        x64, r64 = (np.array(a, dtype=np.float64) for a in (x, residual))
        if not channels_last:
            x64, r64 = np.moveaxis(x64, 1, -1), np.moveaxis(r64, 1, -1)
        h = x64 @ np.array(fc1.weight, dtype=np.float64).T + np.array(fc1.bias, dtype=np.float64)
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        ref = r64 + np.array(scale, dtype=np.float64) * (
            h @ np.array(fc2.weight, dtype=np.float64).T + np.array(fc2.bias, dtype=np.float64)
        )
        ref = ref if channels_last else np.moveaxis(ref, -1, 1)
        out = fused_mlp(x, residual, fc1, fc2, scale, channels_last)
        assert out is not None and out.shape == residual.shape
        assert np.abs(np.array(out) - ref).max() <= 1e-6 * np.abs(ref).max(), (shape, channels_last)

    class FFN(nn.Module):  # conv_ffn_residual's inputs: a depthwise conv, then the MLP
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = (
                nn.Conv2d(16, 16, 3, padding=1, groups=16),
                nn.Linear(16, 64),
                nn.Linear(64, 16),
            )

    ffn, x, scale = FFN(), mx.random.normal((1, 16, 12, 12)), mx.random.normal((16,))
    plain = cpu_vision.depthwise(ffn.conv, x, True)
    plain = x + scale[:, None, None] * cpu_vision.pointwise(
        ffn.fc2, cpu_math.gelu(cpu_vision.pointwise(ffn.fc1, plain, True)), True
    )
    fused = cpu_vision.conv_ffn_residual(ffn, x, scale, True)
    assert (mx.abs(fused - plain).max() <= 1e-5 * mx.abs(plain).max()).item()


def _qwen2_and_its_cpu_copy(seed: int, layers: int, tied: bool, stored=mx.float32):
    """A small mlx-lm Qwen2 with random weights, and a copy of it with the CPU variants installed.  With
    ``stored=mx.bfloat16`` the weights are bfloat16 values: ours keeps its linear and embedding weights in
    bfloat16 as the loader does for a bfloat16 checkpoint, mlx-lm's holds them widened to float32."""
    from mlx.utils import tree_map
    from mlx_lm.models import qwen2

    from fastvlm_mlx.cpu import decoder

    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=50,
        tie_word_embeddings=tied,
    )
    mx.random.seed(seed)
    ours = qwen2.Model(args)
    ours.set_dtype(stored)
    compact = decoder.stored_compact(ours)
    ours.set_dtype(mx.float32)
    ours.load_weights(compact, strict=False)
    theirs = qwen2.Model(args)
    theirs.update(tree_map(lambda a: a.astype(mx.float32), ours.parameters()))
    decoder.install(ours)
    return theirs, ours


@requires_c_kernels
@pytest.mark.parametrize("stored", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_decoder_layers_match_mlx_lm_with_a_cached_prefix(monkeypatch, stored):
    """mlx-lm's Qwen2 with the CPU variants (attention, SiLU gate, the few-row matmul of every linear layer
    and of the tied output projection) gives mlx-lm's own outputs for a batch of 3: a prefill, a multi-token
    step over the cached prefix, then single-token decode steps, which go through the compiled kernel (the
    bfloat16 one for weights stored so)."""
    from mlx_lm.models.cache import make_prompt_cache

    from fastvlm_mlx.cpu import decoder, skinny

    theirs, ours = _qwen2_and_its_cpu_copy(seed=5, layers=2, tied=True, stored=stored)
    assert type(ours.layers[0].self_attn.q_proj) is decoder.CpuLinear
    assert type(ours.model.embed_tokens) is decoder.CpuEmbedding
    assert ours.layers[0].self_attn.q_proj.weight.dtype == ours.model.embed_tokens.weight.dtype == stored
    assert ours.model.norm.weight.dtype == mx.float32
    kernel_rows = []
    key = np.dtype(np.uint16 if stored == mx.bfloat16 else np.float32)  # the weight's memory as the kernel reads it
    fn = skinny.kernels()[key]
    monkeypatch.setitem(skinny._kernels, key, lambda *a: kernel_rows.append(a[3]) or fn(*a))
    ids = mx.random.randint(0, 50, (3, 14))
    caches = [make_prompt_cache(m) for m in (theirs, ours)]
    # prefix, a multi-token step at offset 5 (3 x 2 rows: the kernel), then decode steps
    for chunk in (ids[:, :5], ids[:, 5:7], ids[:, 7:8], ids[:, 8:9], ids[:, 9:10]):
        ref, out = theirs(chunk, cache=caches[0]), ours(chunk, cache=caches[1])
        assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-5
    assert set(kernel_rows) == {6, 3}, set(kernel_rows)  # the 15-row prefill went to MLX's matmul


@requires_c_kernels
@pytest.mark.parametrize("stored", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cache_kind", ["batch", "rotating"])
def test_numpy_decode_steps_match_mlx_lm_with_left_padded_batches(monkeypatch, stored, cache_kind):
    """Decode steps of the CPU block (norms, SiLU gate and residuals in NumPy) against mlx-lm's own Qwen2, with an
    untied output projection and weights stored in float32 or bfloat16: over a left-padded batch of 3
    (``BatchKVCache`` and its mask, as ``BatchGenerator`` decodes) the rope and attention go through attention.c;
    over a ``RotatingKVCache`` (``max_kv_size``) through mlx-lm's attention. Every layer of every decode step takes
    the NumPy path, and the caches end equal."""
    from mlx_lm.models.cache import BatchKVCache, RotatingKVCache

    from fastvlm_mlx.cpu import attention, decoder
    from fastvlm_mlx.lm_internals import filled_length

    layers = 3
    theirs, ours = _qwen2_and_its_cpu_copy(seed=7, layers=layers, tied=False, stored=stored)
    assert ours.lm_head.weight.dtype == ours.layers[0].mlp.down_proj.weight.dtype == stored
    assert type(ours.layers[0]) is decoder.CpuTransformerBlock
    numpy_steps, kernel_steps = [], []
    original, kernel = decoder.CpuTransformerBlock._decode_input, attention.one_position

    def recording(self, x, cache):
        h = original(self, x, cache)
        numpy_steps.append(h is not None)
        return h

    monkeypatch.setattr(decoder.CpuTransformerBlock, "_decode_input", recording)
    monkeypatch.setattr(decoder, "one_position", lambda *a: kernel_steps.append(a[5]) or kernel(*a))
    padding = [2, 0, 1]
    ids = mx.random.randint(1, 50, (3, 12))
    if cache_kind == "batch":
        caches = [[BatchKVCache(padding) for _ in range(layers)] for _ in range(2)]
    else:
        caches = [[RotatingKVCache(max_size=8) for _ in range(layers)] for _ in range(2)]
    for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:9], ids[:, 9:10]):
        numpy_steps.clear()
        kernel_steps.clear()
        ref, out = theirs(chunk, cache=caches[0]), ours(chunk, cache=caches[1])
        assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-5
        decoding = chunk.shape[1] == 1
        assert numpy_steps == [decoding] * layers
        assert len(kernel_steps) == (layers if decoding and cache_kind == "batch" else 0)
        assert all(cached == filled_length(caches[0][0]) - 1 for cached in kernel_steps)  # what the cache held before
    for a, b in zip(caches[0], caches[1]):
        assert (mx.abs(a.keys - b.keys).max() <= 1e-5 * mx.abs(a.keys).max()).item()


@requires_c_kernels
@pytest.mark.parametrize("stored", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_few_row_matmul_matches_float64(stored):
    """skinny.c against numpy in float64, over every tile and tail: rows 1-8, widths and depths that are
    and are not multiples of the tile sizes (16 weights a step for bfloat16), weights stored in float32 or
    bfloat16 (against the float64 of the bfloat16 values)."""
    from fastvlm_mlx.cpu import skinny

    assert skinny.kernel() is not None, "the kernel could not be built (is there a C compiler?)"
    rng = np.random.default_rng(3)
    for rows in range(1, skinny.MAX_ROWS + 1):
        for n, k in ((1, 1), (7, 13), (8, 8), (37, 64), (19, 40), (100, 901)):
            x, w = rng.normal(size=(rows, k)).astype(np.float32), mx.array(rng.normal(size=(n, k)).astype(np.float32))
            w = w.astype(stored)
            ref = x.astype(np.float64) @ np.array(w.astype(mx.float32)).astype(np.float64).T
            out = np.array(skinny.matmul(mx.array(x), w))
            assert out.shape == (rows, n)
            assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), (rows, n, k)
    x, w = mx.random.normal((2, 3, 64)), mx.random.normal((50, 64))  # leading dimensions are kept
    assert skinny.matmul(x, w).shape == (2, 3, 50)
    assert (mx.abs(skinny.matmul(x, w) - x @ w.T).max() <= 1e-5 * mx.abs(x @ w.T).max()).item()


def _raw_products(fn, cases, threads):
    """The kernel's products for (x, w) pairs, called straight through ctypes with ``threads`` threads."""
    out = []
    for x, w in cases:
        y = np.empty((x.shape[0], w.shape[0]), np.float32)
        fn(x.ctypes.data, w.ctypes.data, y.ctypes.data, x.shape[0], w.shape[0], x.shape[1], threads)
        out.append(y)
    return out


@requires_c_kernels
def test_few_row_matmul_pool_under_threads_and_fork():
    """The kernel's worker pool: calls from several Python threads at once, with a thread count that
    grows and shrinks the pool, and a forked child (which has none of the parent's workers) all give
    the float64 products."""
    import os
    import time

    from fastvlm_mlx.cpu import skinny

    fn = skinny.kernel()
    assert fn is not None, "the kernel could not be built (is there a C compiler?)"
    rng = np.random.default_rng(5)
    cases = [
        (rng.normal(size=(r, k)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32))
        for r, n, k in ((1, 901, 64), (8, 77, 33), (3, 1000, 896), (5, 9, 8))
    ]
    refs = [x.astype(np.float64) @ w.astype(np.float64).T for x, w in cases]

    def close(outs):
        return all(np.abs(o - r).max() <= 1e-5 * np.abs(r).max() for o, r in zip(outs, refs))

    assert _passes_in_threads(
        4, lambda: all(close(_raw_products(fn, cases, t)) for _ in range(20) for t in (1, 2, 3, 5))
    )

    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only when its own pool gives the right products
        os._exit(0 if close(_raw_products(fn, cases, 3)) else 1)
    deadline = time.time() + 30
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child's kernel call hung")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_few_row_matmul_leaves_what_it_does_not_cover_to_mlx():
    from fastvlm_mlx.cpu import skinny
    from fastvlm_mlx.cpu.decoder import CpuLinear

    w = mx.random.normal((32, 32))
    assert skinny.matmul(mx.random.normal((skinny.MAX_ROWS + 1, 32)), w) is None  # a prefill: sgemm is as fast
    assert skinny.matmul(mx.random.normal((1, 32)).astype(mx.float16), w.astype(mx.float16)) is None
    assert skinny.matmul(mx.random.normal((1, 16)), w) is None  # shapes that do not fit
    assert skinny.matmul(mx.random.normal((1, 32)), w.T) is None  # a transposed view is not row-major
    layer = nn.Linear(32, 8)
    plain = layer(mx.ones((2, 32)))
    layer.__class__ = CpuLinear
    assert (mx.abs(layer(mx.ones((2, 32))) - plain).max() < 1e-5).item()  # through the kernel, bias added
    # inside mx.compile there are no values to read: MLX's matmul is traced instead
    assert (mx.abs(mx.compile(layer)(mx.ones((2, 32))) - plain).max() < 1e-5).item()
