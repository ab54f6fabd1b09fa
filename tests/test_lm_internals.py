"""The contract with mlx-lm (fastvlm_mlx/lm_internals.py): every field, class and signature we rely on beyond its
documented API exists in the installed mlx-lm and means what we take it to mean; older versions are refused in
one line; the floor agrees with pyproject's. CI runs this both with the newest mlx-lm and with the floor's."""

import dataclasses
import inspect
import re
import sys
from importlib import metadata

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import ROOT
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, RotatingKVCache

from fastvlm_mlx import FastVLMError, lm_internals


def _floor(requirement_prefix: str) -> str:
    """The version after ``>=`` in pyproject's dependency line that starts with ``requirement_prefix``."""
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (line,) = [d for d in deps if d.startswith(requirement_prefix)]
    return re.search(r">=\s*([\d.]+)", line).group(1)


def test_the_floor_is_pyprojects_and_mlx_lms_own_mlx_floor_is_within_ours():
    assert lm_internals.MIN_MLX_LM == _floor("mlx-lm")
    ours = {_floor("mlx>="), _floor("mlx[cpu]>=")}
    assert len(ours) == 1
    # what the installed mlx-lm asks of mlx on a Mac must not be above what we state
    for requirement in metadata.requires("mlx-lm") or []:
        found = re.match(r"mlx\s*>=\s*([\d.]+)\s*;\s*platform_system\s*==\s*['\"]Darwin", requirement)
        if found and lm_internals.MIN_MLX_LM == metadata.version("mlx-lm"):
            assert lm_internals._release(found.group(1)) <= lm_internals._release(ours.pop())


def test_older_mlx_lm_is_refused_in_one_line(monkeypatch):
    lm_internals.require_mlx_lm()  # the installed one passes
    lm_internals.require_mlx_lm("9.0.0")
    lm_internals.require_mlx_lm(lm_internals.MIN_MLX_LM + ".post1")
    with pytest.raises(FastVLMError) as e:
        lm_internals.require_mlx_lm("0.31.3")
    assert "mlx-lm 0.31.3" in str(e.value) and lm_internals.MIN_MLX_LM in str(e.value) and "\n" not in str(e.value)

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(FastVLMError, match="mlx-lm is not installed"):
        lm_internals.require_mlx_lm()


def _kv(batch: int, length: int, start: int = 0, dim: int = 4) -> mx.array:
    """Keys (or values) whose every element names its position: (batch, 2 heads, length, dim)."""
    positions = mx.arange(start, start + length, dtype=mx.float32)[None, None, :, None]
    return mx.broadcast_to(positions, (batch, 2, length, dim))


def test_filled_length_counts_the_positions_the_buffers_hold():
    cache = KVCache()
    assert not lm_internals.is_plain_kv_cache(cache)  # nothing stored yet
    cache.update_and_fetch(_kv(1, 5), _kv(1, 5))
    assert lm_internals.is_plain_kv_cache(cache) and lm_internals.filled_length(cache) == 5
    assert (cache.keys[:, :, :5] == _kv(1, 5)).all().item()

    # a left-padded batch: offsets differ per sequence, the buffers are written up to one index for all
    batch = BatchKVCache([2, 0])
    batch.update_and_fetch(_kv(2, 6), _kv(2, 6))
    batch.update_and_fetch(_kv(2, 1, 6), _kv(2, 1, 6))
    assert lm_internals.is_plain_kv_cache(batch)
    assert batch.offset.tolist() == [5, 7] and lm_internals.filled_length(batch) == 7
    assert (batch.keys[:, :, :7] == _kv(2, 7)).all().item()  # the write index is where the next position goes
    assert batch.keys.shape[2] > 7  # the buffer is longer than what it holds: the length must come from the state
    batch.trim(2)
    assert lm_internals.filled_length(batch) == 5 and batch.offset.tolist() == [3, 5]


def test_other_caches_are_not_taken_for_plain_ones():
    rotating, quantized = RotatingKVCache(max_size=8), QuantizedKVCache()
    for cache in (rotating, quantized):
        cache.update_and_fetch(_kv(1, 16, dim=64), _kv(1, 16, dim=64))  # quantized in groups of 64
    assert not lm_internals.is_plain_kv_cache(rotating) and not lm_internals.is_plain_kv_cache(quantized)
    assert lm_internals.is_quantized_cache(quantized) and quantized.bits
    assert not lm_internals.is_quantized_cache(rotating) and not lm_internals.is_quantized_cache(KVCache())


def _tiny_qwen2() -> qwen2.Model:
    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=64,
        num_key_value_heads=2,
    )
    return qwen2.Model(args)


def test_qwen2_modules_have_what_the_cpu_variants_read():
    model = _tiny_qwen2()
    block = model.layers[0]
    assert type(block) is qwen2.TransformerBlock
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        assert hasattr(block, name), name
    attn = block.self_attn
    assert type(attn) is qwen2.Attention and (attn.n_heads, attn.n_kv_heads) == (4, 2)
    assert attn.scale == pytest.approx(8**-0.5)
    assert type(attn.rope) is nn.RoPE and not attn.rope.traditional and attn.rope.dims == 8
    assert attn.rope.base == 1000000 and attn.rope.scale == 1.0
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(attn, name)) is nn.Linear
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(block.mlp, name)) is nn.Linear
    for cls in (qwen2.Attention, qwen2.TransformerBlock):
        assert list(inspect.signature(cls.__call__).parameters) == ["self", "x", "mask", "cache"], cls


def test_become_keeps_every_weight_and_refuses_unrelated_classes():
    from fastvlm_mlx.cpu import decoder

    model = _tiny_qwen2()
    before = {k: v for k, v in tree_flatten(model.parameters())}
    decoder.install(model)
    layer = model.layers[0]
    assert (type(layer), type(layer.self_attn), type(layer.mlp)) == (
        decoder.CpuTransformerBlock,
        decoder.CpuAttention,
        decoder.CpuMLP,
    )
    after = {k: v for k, v in tree_flatten(model.parameters())}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    with pytest.raises(TypeError, match="not a subclass"):
        lm_internals.become(layer.mlp, decoder.CpuAttention)


def test_generation_stream_and_wired_limit_are_mlx_lms_own():
    """The stream generate_step evaluates on by default (so that our prefills share it), and the wired-memory
    context taking the model and a list of streams."""
    from mlx_lm.generate import generate_step

    stream = lm_internals.generation_stream
    assert inspect.signature(generate_step).parameters["stream"].default is stream
    mx.synchronize(stream)
    with lm_internals.wired_limit(_tiny_qwen2(), [stream]):
        mx.eval(mx.ones(4) + 1)
    takes = list(inspect.signature(lm_internals.wired_limit).parameters)
    assert takes == ["model", "streams"], takes


def test_the_documented_but_young_apis_we_call_take_our_arguments():
    """Not internals, but changed shape across mlx-lm releases: what engine.py, batching.py and session.py pass."""
    from mlx_lm.generate import BatchGenerator, GenerationResponse, generate_step
    from mlx_lm.models.base import scaled_dot_product_attention
    from mlx_lm.models.cache import LRUPromptCache, load_prompt_cache, save_prompt_cache

    def takes(fn, *names):
        params = inspect.signature(fn).parameters
        missing = [n for n in names if n not in params]
        assert not missing, (fn, missing)

    takes(generate_step, "max_tokens", "sampler", "logits_processors", "prompt_cache", "input_embeddings")
    takes(BatchGenerator.__init__, "model", "stop_tokens", "completion_batch_size", "prefill_batch_size")
    takes(BatchGenerator.insert, "max_tokens", "caches", "samplers", "logits_processors")
    takes(BatchGenerator.remove, "return_prompt_caches")
    assert callable(BatchGenerator.next_generated)
    takes(LRUPromptCache.__init__, "max_size", "max_bytes")
    takes(LRUPromptCache.fetch_nearest_cache, "model", "tokens")
    takes(LRUPromptCache.insert_cache, "model", "tokens", "prompt_cache")
    assert isinstance(LRUPromptCache(max_size=4, max_bytes=1 << 20).nbytes, int)
    takes(load_prompt_cache, "return_metadata")
    takes(save_prompt_cache, "metadata")
    takes(scaled_dot_product_attention, "cache", "scale", "mask")
    fields = {f.name for f in dataclasses.fields(GenerationResponse)}
    assert {"text", "token", "logprobs", "finish_reason", "prompt_tokens", "generation_tokens"} <= fields
