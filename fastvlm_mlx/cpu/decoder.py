"""mlx-lm's Qwen2 block, attention and MLP, and the decoder's linear layers, with the CPU kernels: same
weights and names, same maths.

``fastvlm_mlx.cpu.install`` turns each decoder layer, its ``self_attn`` and ``mlp``, and every plain
``nn.Linear`` and ``nn.Embedding`` of the decoder, into these, so the rest of mlx-lm (KV caches,
generation loop, sharding, quantization) is untouched.

The linear and embedding weights may be stored in bfloat16 while the model computes in float32
(``stored_compact``): a bfloat16 checkpoint's values widen exactly to float32, so the kernels read the
checkpoint's own 16 bits and widen them as they go (half the bytes a decode step streams), and the
prefill's BLAS matmuls take a widened copy.
"""

import functools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.models.base import scaled_dot_product_attention

from ..lm_internals import become, filled_length, is_plain_kv_cache, is_quantized_cache
from . import skinny
from .attention import one_position
from .formulas import attention, on_cpu_float32, swiglu


class CpuAttention(qwen2.Attention):
    """Steps of more than one position (the prefill) use ``formulas.attention``, whose softmax is vectorized
    where MLX's CPU exp is scalar; ``CpuTransformerBlock``'s decode steps use ``attend_one_position``; other one-token
    steps, quantized KV caches, explicit mask arrays and other dtypes go to mlx-lm's own code."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        length = x.shape[1]
        plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
        if length == 1 or not on_cpu_float32(x) or is_quantized_cache(cache) or not plain_mask:
            return super().__call__(x, mask=mask, cache=cache)
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask, cache))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        """What lies between the projections, as in mlx-lm: split the heads, rope, the KV cache, softmax
        attention (``formulas.attention`` for a prefill, mlx-lm's for a decode step and its masks)."""
        b, length, _ = q.shape
        q, k, v = (
            a.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)
            for a, heads in ((q, self.n_heads), (k, self.n_kv_heads), (v, self.n_kv_heads))
        )
        offset = 0 if cache is None else cache.offset
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if length == 1:
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        else:
            out = attention(q, k, v, self.scale, causal=mask == "causal")
        return out.transpose(0, 2, 1, 3).reshape(b, length, -1)

    def attend_one_position(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask, cache) -> np.ndarray | None:
        """``attend`` for a decode step on NumPy rows, (sequences, width) in and out: the rope and the attention
        in ``attention.c``, which reads mlx-lm's cache as it is; the new key and value go into that cache
        without waiting for it. Through MLX's CPU ops these few thousand floats cost mostly scheduling and
        waiting for MLX's stream. None where this does not apply (other caches, additive masks, other rope variants, no
        compiler): the caller then takes ``attend``."""
        if not is_plain_kv_cache(cache) or not _plain_rope(self.rope):
            return None
        b = len(q)
        found = self._attend_cached(
            q.reshape(b, self.n_heads, -1),
            k.reshape(b, self.n_kv_heads, -1),
            v.reshape(b, self.n_kv_heads, -1),
            mask,
            cache,
        )
        if found is None:
            return None
        out, k_roped = found
        # the cache's old buffers must have no other holders now, so that MLX writes the new position in place
        cache.update_and_fetch(mx.array(k_roped[:, :, None]), mx.array(v.reshape(b, self.n_kv_heads, 1, -1)))
        mx.async_eval(cache.keys, cache.values, *([cache.offset] if isinstance(cache.offset, mx.array) else []))
        return out

    def _attend_cached(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask, cache) -> tuple | None:
        """(out, roped key) from the cache as it stands, or None. A function of its own so that its NumPy views
        of the cache's buffers are gone when the caller updates the cache (else MLX copies the whole buffer)."""
        cached = filled_length(cache)  # positions in the buffers
        keep = _kept_keys(mask, len(q), cached + 1)
        if keep is False:
            return None
        positions = np.broadcast_to(np.asarray(cache.offset, dtype=np.float32), (len(q),))
        inv_freq = _rope_frequencies(self.rope.dims, self.rope.base, self.rope.scale)
        return one_position(q, k, v, cache.keys, cache.values, cached, positions, inv_freq, keep, self.scale)


@functools.lru_cache(maxsize=8)
def _rope_frequencies(dims: int, base: float, scale: float) -> np.ndarray:
    """The rope's angle per position for each pair of dimensions, in float32 as transformers' Qwen2 takes them
    (1 / base ** (2i / dims)), times nn.RoPE's position scale."""
    inv_freq = 1 / np.float32(base) ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)) * np.float32(scale)
    inv_freq.flags.writeable = False
    return inv_freq


def _plain_rope(rope) -> bool:
    """Qwen2's rope as ``attention.c`` applies it: nn.RoPE with its halves rotated (not interleaved)."""
    return type(rope) is nn.RoPE and not rope.traditional


def _kept_keys(mask, sequences: int, keys: int):
    """A decode step's mask as (sequences, keys) booleans: None when every key is seen, False for masks the kernel
    does not take (additive ones, several query positions)."""
    if mask is None or isinstance(mask, str):  # "causal": the one new position sees the whole cache
        return None
    if (
        mask.dtype != mx.bool_
        or mask.ndim not in (2, 4)
        or mask.shape[-1] != keys
        or mask.size // keys not in (1, sequences)
    ):
        return False
    kept = np.asarray(mask).reshape(-1, keys)
    return np.broadcast_to(kept, (sequences, keys))


class CpuMLP(qwen2.MLP):
    """The SiLU gate is ``formulas.swiglu``, vectorized: MLX's CPU sigmoid is scalar, which made the gate a large
    share of a prefill."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class CpuLinear(nn.Linear):
    """A decode step's few rows (one per sequence) go through ``skinny.matmul``, which streams the weight
    at the memory's speed; more rows (the prefill) go to MLX's BLAS matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        y = skinny.matmul(x, self.weight)
        if y is not None:
            return y + self.bias if "bias" in self else y
        w = _widened(self.weight, x)
        return mx.addmm(self.bias, x, w.T) if "bias" in self else x @ w.T


class CpuEmbedding(nn.Embedding):
    """The tied output projection (151936 x 896 for Qwen2-0.5B, a quarter of its weights) as ``CpuLinear``."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = self.weight[x]
        return rows.astype(mx.float32) if rows.dtype == mx.bfloat16 else rows

    def as_linear(self, x: mx.array) -> mx.array:
        y = skinny.matmul(x, self.weight)
        return x @ _widened(self.weight, x).T if y is None else y


def _widened(weight: mx.array, x: mx.array) -> mx.array:
    """A bfloat16-stored weight as x's float32 for MLX's matmul (exact; MLX widens at the memory's speed)."""
    return weight.astype(x.dtype) if weight.dtype == mx.bfloat16 and x.dtype == mx.float32 else weight


class CpuTransformerBlock(qwen2.TransformerBlock):
    """A decode step (one position of at most 8 sequences) with its norms, SiLU gate and residuals in NumPy.

    These are a few thousand floats per step, but handing each matmul's input from MLX to ``skinny`` means
    waiting for MLX's CPU stream (most of it the time to wake its idle thread), four times a layer. With the
    small maths in NumPy and the rope and attention in ``attention.c`` (``CpuAttention.attend_one_position``),
    a layer does not wait for MLX at all: the new key and value go into mlx-lm's KV cache asynchronously.
    Other caches and masks take mlx-lm's attention, one wait a layer.
    Prefills, and layers that are sharded, quantized or not float32, run as mlx-lm's block does."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        step = self._decode_input(x, cache)
        if step is None:
            return super().__call__(x, mask, cache)
        h, (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) = step
        xn = _rms_norm(h, self.input_layernorm)
        q, k, v = (_linear(xn, p) for p in (q_proj, k_proj, v_proj))
        out = self.self_attn.attend_one_position(q, k, v, mask, cache)
        if out is None:
            out = self.self_attn.attend(*(mx.array(a[:, None]) for a in (q, k, v)), mask, cache)
            out = np.asarray(out).reshape(len(h), -1)
        h = h + _linear(out, o_proj)
        hn = _rms_norm(h, self.post_attention_layernorm)
        h = h + _linear(_silu(_linear(hn, gate_proj)) * _linear(hn, up_proj), down_proj)
        return mx.array(h[:, None])  # evaluated: the next layer starts without waiting

    def _decode_input(self, x: mx.array, cache) -> tuple | None:
        """(x as a (sequences, hidden) NumPy array, each linear layer as a (weight memory, bias or None) pair) when
        this is a decode step the NumPy path takes, else None."""
        if x.ndim != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= skinny.MAX_ROWS or not on_cpu_float32(x):
            return None
        if cache is None or is_quantized_cache(cache) or skinny.kernel() is None:
            return None
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if type(attn) is not CpuAttention or any(type(p) is not CpuLinear for p in linears):
            return None  # sharded or quantized layers
        try:
            mx.eval(x)
        except ValueError:  # being traced (mx.compile): no data to read
            return None
        weights = [skinny.weight_memory(p.weight) for p in linears]  # reading the memory evaluates a weight
        if any(w is None for w in weights):
            return None  # other dtypes, or not row-major
        biases = [np.asarray(p.bias) if "bias" in p else None for p in linears]
        return np.asarray(x).reshape(x.shape[0], -1), tuple(zip(weights, biases))


def _linear(x: np.ndarray, layer: tuple) -> np.ndarray:
    """x times a (weight memory, bias or None) pair of ``_decode_input``."""
    weight, bias = layer
    y = skinny.rows_times(x, weight)
    return y if bias is None else y + bias


def _rms_norm(x: np.ndarray, norm: nn.RMSNorm) -> np.ndarray:
    """mx.fast.rms_norm's maths: x / sqrt(mean(x^2) + eps) * weight, in float32 (the mean as a sum: NumPy's
    np.mean costs more than the arithmetic at these sizes)."""
    mean = np.square(x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])
    return x * (1 / np.sqrt(mean + np.float32(norm.eps))) * np.asarray(norm.weight)


def _silu(g: np.ndarray) -> np.ndarray:
    """g * sigmoid(g) as g / (1 + exp(-g)): below g = -88 exp overflows to inf and the result is -0, where the
    true value is under 1e-36."""
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g))


def stored_compact(language_model: nn.Module) -> list:
    """(path, weight) of the decoder's plain linear and embedding weights that the checkpoint stores in
    bfloat16: the loader keeps them so when it casts the model to float32 (the CPU variants widen them
    exactly as they read them), which halves their memory and what a decode step streams."""
    if not skinny.kernels():
        return []
    kept = []
    for path, module in language_model.named_modules():
        if type(module) in (nn.Linear, nn.Embedding) and module.weight.dtype == mx.bfloat16:
            kept.append((f"{path}.weight" if path else "weight", module.weight))
    return kept


def install(language_model: nn.Module) -> None:
    """Turn an mlx-lm Qwen2 model's blocks, attention, MLPs, linear layers and embedding into the variants above;
    the few-row kernel is built now, so that a missing compiler is reported at load, not mid-answer."""
    skinny.kernel()
    for layer in language_model.layers:
        if type(layer) is qwen2.TransformerBlock:
            become(layer, CpuTransformerBlock)
        become(layer.self_attn, CpuAttention)
        become(layer.mlp, CpuMLP)
    variants = {nn.Linear: CpuLinear, nn.Embedding: CpuEmbedding}  # exact types: sharded or quantized ones stay
    for _, module in language_model.named_modules():
        if type(module) in variants:
            module.__class__ = variants[type(module)]
