"""mlx-lm's Qwen2 attention and MLP, and the decoder's linear layers, with the CPU kernels: same
weights and names, same maths.

``fastvlm_mlx.cpu.install`` turns each decoder layer's ``self_attn`` and ``mlp``, and every plain
``nn.Linear`` and ``nn.Embedding`` of the decoder, into these, so the rest of mlx-lm (KV caches,
generation loop, sharding, quantization) is untouched.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from . import skinny
from .kernels import attention, on_cpu_float32, swiglu


class CpuAttention(qwen2.Attention):
    """Steps of more than one position (the prefill) use ``kernels.attention``, whose softmax is 7x faster
    than MLX's on the CPU; one-token decode steps, quantized KV caches, explicit mask arrays and other
    dtypes go to mlx-lm's own code."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        b, length, _ = x.shape
        plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
        if length == 1 or not on_cpu_float32(x) or hasattr(cache, "bits") or not plain_mask:
            return super().__call__(x, mask=mask, cache=cache)
        q, k, v = (
            proj(x).reshape(b, length, heads, -1).transpose(0, 2, 1, 3)
            for proj, heads in ((self.q_proj, self.n_heads), (self.k_proj, self.n_kv_heads), (self.v_proj, self.n_kv_heads))
        )
        offset = 0 if cache is None else cache.offset
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, causal=mask == "causal")
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class CpuMLP(qwen2.MLP):
    """The SiLU gate is ``kernels.swiglu``: 7x faster than MLX's scalar sigmoid on the CPU, which took a
    quarter of a 300-position prefill."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class CpuLinear(nn.Linear):
    """A decode step's few rows (one per sequence) go through ``skinny.matmul``, which streams the weight
    at the memory's speed; more rows (the prefill) go to MLX's BLAS matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        y = skinny.matmul(x, self.weight)
        if y is None:
            return super().__call__(x)
        return y + self.bias if "bias" in self else y


class CpuEmbedding(nn.Embedding):
    """The tied output projection (151936 x 896 for Qwen2-0.5B, a quarter of its weights) as ``CpuLinear``."""

    def as_linear(self, x: mx.array) -> mx.array:
        y = skinny.matmul(x, self.weight)
        return super().as_linear(x) if y is None else y


def install(language_model: nn.Module) -> None:
    """Turn an mlx-lm Qwen2 model's attention, MLPs, linear layers and embedding into the variants above;
    the few-row kernel is built now, so that a missing compiler is reported at load, not mid-answer."""
    skinny.kernel()
    for layer in language_model.layers:
        layer.self_attn.__class__ = CpuAttention
        layer.mlp.__class__ = CpuMLP
    variants = {nn.Linear: CpuLinear, nn.Embedding: CpuEmbedding}  # exact types: sharded or quantized ones stay
    for _, module in language_model.named_modules():
        if type(module) in variants:
            module.__class__ = variants[type(module)]
