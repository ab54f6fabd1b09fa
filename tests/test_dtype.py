"""The dtype a model computes in, and a clear error when half precision overflows.

Device and dtype: each test names the dtype it loads; the GPU's default is exercised by making MLX report a GPU as
its default device (the plain path then runs on this CPU, as it would on Metal).
"""

import mlx.core as mx
import pytest
from conftest import FIXTURES, PHOTO

from fastvlm_mlx import FastVLMError, generate, load
from fastvlm_mlx.errors import NonFiniteLogitsError
from fastvlm_mlx.loader import default_dtype, parse_dtype


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory):
    """format_a stored in bfloat16, as the published mlx-community and transformers conversions are."""
    from fastvlm_convert import convert_checkpoint

    out = tmp_path_factory.mktemp("bf16") / "model"
    convert_checkpoint(FIXTURES / "format_a", out, dtype="bfloat16")
    return out


def _as_if_on_a_gpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.delenv("FASTVLM_MLX_DTYPE", raising=False)


def test_a_gpu_computes_in_the_checkpoints_own_dtype(bfloat16_checkpoint, monkeypatch):
    _as_if_on_a_gpu(monkeypatch)
    assert default_dtype(mx.bfloat16) == mx.bfloat16
    assert default_dtype(mx.float32) == mx.float32
    model, processor = load(str(bfloat16_checkpoint))
    assert model.language_model.model.norm.weight.dtype == mx.bfloat16
    assert model.vision_tower.dtype == mx.bfloat16
    assert generate(model, processor, "Describe.", image=str(PHOTO), max_tokens=4) is not None


def test_the_cpu_computes_in_float32_unless_told(bfloat16_checkpoint, monkeypatch):
    monkeypatch.delenv("FASTVLM_MLX_DTYPE", raising=False)
    if mx.default_device() != mx.cpu:
        pytest.skip("this test is about the CPU's default; the default device here is a GPU")
    assert default_dtype(mx.bfloat16) == mx.float32
    model, _ = load(str(bfloat16_checkpoint), dtype="float16")
    assert model.language_model.model.norm.weight.dtype == mx.float16
    monkeypatch.setenv("FASTVLM_MLX_DTYPE", "bfloat16")
    model, _ = load(str(FIXTURES / "format_a"))
    assert model.language_model.model.norm.weight.dtype == mx.bfloat16


def test_unknown_dtype_names_are_refused():
    assert parse_dtype("BFloat16") == mx.bfloat16
    with pytest.raises(FastVLMError, match="unknown dtype 'float8'"):
        parse_dtype("float8")


def _overflowing(dtype):
    """format_a in ``dtype`` with its final norm scaled past float16's range (65504), as Qwen2's larger models
    overflow float16 in their last layers."""
    model, processor = load(str(FIXTURES / "format_a"), dtype=dtype)
    norm = model.language_model.model.norm
    norm.weight = norm.weight * 1e6
    mx.eval(norm.weight)
    return model, processor


def test_non_finite_logits_are_an_error_that_names_the_dtype_and_the_fix():
    model, processor = _overflowing(mx.float16)
    with pytest.raises(NonFiniteLogitsError, match=r"not finite .* in float16: load it with dtype='bfloat16'"):
        generate(model, processor, "Describe.", image=str(PHOTO), max_tokens=4)


def test_a_batch_drops_only_the_sequence_whose_logits_overflowed():
    from fastvlm_mlx.batching import BatchDecoder
    from fastvlm_mlx.engine import Sampling, engine_for
    from fastvlm_mlx.processor import one_turn

    model, processor = _overflowing(mx.float16)
    engine = engine_for(model, processor)
    decoder = BatchDecoder(engine, max_batch=2)
    prompt = engine.prepare(one_turn("Describe.", str(PHOTO)))
    (admitted,) = decoder.admit([(prompt, Sampling(max_tokens=4))])
    tokens = decoder.step()
    assert [(t.uid, t.finish_reason) for t in tokens] == [(admitted.uid, "error")]
    assert "float16" in tokens[0].error
    assert len(decoder) == 0 and decoder.step() == []
