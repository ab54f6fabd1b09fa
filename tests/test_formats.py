"""Every checkpoint format gives the PyTorch reference numbers (transformers/timm, float32).

Device and dtype: the process default (``precision.DTYPE``: float32 on this CPU and on a Mac for the float32
fixtures, half precision in CI's second lane), with the tolerances ``precision`` derives for it; the tests of the
CPU tower need the CPU layer (float32 on Linux's CPU) and say so when they skip."""

import json

import mlx.core as mx
import pytest
from conftest import FIXTURES, FORMATS, PHOTO, rel_err
from precision import (
    DTYPE,
    EMBEDS_TOL,
    LOGITS_TOL,
    TEXT_LOGITS_TOL,
    VISION_TOL,
    requires_cpu_layer,
    tolerance,
)

from fastvlm_mlx import load, stream_generate
from fastvlm_mlx.model import IMAGE_PLACEHOLDER


@pytest.fixture(scope="module", params=FORMATS)
def loaded(request):
    return request.param, load(str(FIXTURES / request.param))


def first_logits(model, ids, image_embeds=None):
    embeddings = model.embed_prompt(ids, image_embeds)
    return model(mx.array([[0] * embeddings.shape[0]]), input_embeddings=embeddings[None])[0, -1]


def test_vision_features_match_reference(loaded, reference):
    _, (model, _) = loaded
    arrays, meta = reference
    features = model.vision_tower(arrays["pixels"])
    n = meta["num_image_tokens"]
    assert features.shape == (1, int(n**0.5), int(n**0.5), meta["mm_hidden_size"])
    assert rel_err(features.reshape(1, n, -1), arrays["vision_features"]) <= VISION_TOL


def test_projected_embeddings_match_reference(loaded, reference):
    _, (model, _) = loaded
    arrays, _ = reference
    assert rel_err(model.encode_image(arrays["pixels"]), arrays["image_embeds"]) <= EMBEDS_TOL


def test_prompt_tokens_match_apple_splice(loaded, reference):
    _, (_, processor) = loaded
    arrays, meta = reference
    assert processor.encode(meta["prompt_text"]) == arrays["input_ids_apple"].tolist()


def test_first_step_logits_match_reference(loaded, reference):
    _, (model, processor) = loaded
    arrays, meta = reference
    ids = processor.encode(meta["prompt_text"])
    logits = first_logits(model, ids, model.encode_image(arrays["pixels"]))
    vocab = min(logits.shape[0], arrays["logits_first"].shape[0])  # format B pads the vocabulary
    assert rel_err(logits[:vocab], arrays["logits_first"][:vocab]) <= LOGITS_TOL


def test_text_only_logits_match_reference(loaded, reference):
    _, (model, processor) = loaded
    arrays, meta = reference
    ids = processor.encode(meta["text_only_prompt"])
    assert ids == arrays["text_only_ids"].tolist()
    logits = first_logits(model, ids)
    vocab = min(logits.shape[0], arrays["text_only_logits"].shape[0])
    assert rel_err(logits[:vocab], arrays["text_only_logits"][:vocab]) <= TEXT_LOGITS_TOL


def test_the_tolerances_are_tight_enough_to_see_a_dropped_bias(reference):
    """The control for the tolerances above: the fixture with one defect a converter could make (the projector's
    last bias dropped) misses the reference by more than the tolerance of the dtype it computes in."""
    arrays, meta = reference
    model, processor = load(str(FIXTURES / "format_a"))
    assert model.language_model.model.norm.weight.dtype == DTYPE
    model.projector.linear_2.bias = mx.zeros_like(model.projector.linear_2.bias)
    embeds = model.encode_image(arrays["pixels"])
    assert rel_err(embeds, arrays["image_embeds"]) > EMBEDS_TOL
    logits = first_logits(model, processor.encode(meta["prompt_text"]), embeds)
    assert rel_err(logits[:448], arrays["logits_first"][:448]) > LOGITS_TOL


def test_formats_agree_with_each_other(reference):
    arrays, meta = reference
    outputs = []
    for name in FORMATS:
        model, processor = load(str(FIXTURES / name))
        logits = first_logits(model, processor.encode(meta["prompt_text"]), model.encode_image(arrays["pixels"]))
        outputs.append(logits[:448])
    for other in outputs[1:]:
        assert rel_err(other, outputs[0]) <= 1e-5


def test_quantized_mlx_community_checkpoint(reference):
    """Format C quantized to 4 bits by mlx-vlm's own convert steps (as mlx-community/FastVLM-0.5B-4bit ships):
    the decoder and projector load as quantized layers and give mlx-vlm's own first-step logits."""
    from mlx.nn import QuantizedLinear

    arrays, meta = reference
    model, processor = load(str(FIXTURES / "format_c_4bit"))
    assert model.config.mm_hidden_size == meta["mm_hidden_size"]
    assert isinstance(model.projector.linear_1, QuantizedLinear)
    assert isinstance(model.language_model.layers[0].mlp.gate_proj, QuantizedLinear)
    expected = mx.load(str(FIXTURES / "reference_c4bit.safetensors"))["logits_first"]
    logits = first_logits(model, processor.encode(meta["prompt_text"]), model.encode_image(arrays["pixels"]))
    assert rel_err(logits[: expected.shape[0]], expected) <= LOGITS_TOL
    # the vision tower stays in floating point, so its features are the unquantized reference's
    n = meta["num_image_tokens"]
    assert rel_err(model.vision_tower(arrays["pixels"]).reshape(1, n, -1), arrays["vision_features"]) <= VISION_TOL


def test_untied_head_detected_despite_config(reference):
    """Format A's config.json says tie_word_embeddings=true but ships lm_head.weight: the head must be used."""
    assert json.loads((FIXTURES / "format_a" / "config.json").read_text())["tie_word_embeddings"] is True
    model, _ = load(str(FIXTURES / "format_a"))
    assert model.config.text_config["tie_word_embeddings"] is False
    assert "lm_head" in model.language_model


def test_tied_head_when_lm_head_absent(fixture_copy, reference):
    """Without lm_head.weight the embeddings serve as the head, whatever config.json says."""
    import mlx.core as mx

    path = fixture_copy("format_c")
    weights = mx.load(str(path / "model.safetensors"))
    embed = weights["language_model.model.embed_tokens.weight"]
    del weights["language_model.lm_head.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    model, processor = load(str(path))
    assert model.config.text_config["tie_word_embeddings"] is True
    ids = processor.encode(reference[1]["text_only_prompt"])
    hidden = model.language_model.model(mx.array([ids]))[0, -1]
    # one layer apart: the head as the model computes it (in its dtype) against the float32 embeddings
    assert rel_err(first_logits(model, ids), hidden @ embed.T) <= tolerance(1e-5, 1)


@requires_cpu_layer
def test_bfloat16_checkpoint_loads(fixture_copy, reference, monkeypatch):
    """Released transformers checkpoints are bf16; they load and stay close to the fp32 reference.  On the CPU the
    decoder's linear and embedding weights stay in bf16 (the kernels widen them exactly), and the model gives the
    logits of mlx-lm's own Qwen2 computing in float32 on the same values."""
    path = fixture_copy("format_b")
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in weights.items()},
    )
    model, processor = load(str(path))
    arrays, meta = reference
    assert model.vision_tower.stem.layers[0].weight.dtype == mx.float32  # CPU default
    assert rel_err(model.encode_image(arrays["pixels"]), arrays["image_embeds"]) <= 0.05

    lm = model.language_model
    assert {lm.layers[0].mlp.gate_proj.weight.dtype, lm.model.embed_tokens.weight.dtype, lm.lm_head.weight.dtype} == {
        mx.bfloat16
    }
    assert lm.model.norm.weight.dtype == mx.float32 and model.projector.linear_1.weight.dtype == mx.float32
    monkeypatch.setenv("FASTVLM_MLX_CPU", "0")
    plain, _ = load(str(path))  # mlx-lm's plain modules, every weight widened to float32
    assert plain.language_model.layers[0].mlp.gate_proj.weight.dtype == mx.float32
    ids = processor.encode(meta["prompt_text"])
    embeds = plain.encode_image(arrays["pixels"])
    assert rel_err(first_logits(model, ids, embeds), first_logits(plain, ids, embeds)) <= 1e-5
    text_ids = processor.encode(meta["text_only_prompt"])
    assert rel_err(first_logits(model, text_ids), first_logits(plain, text_ids)) <= 1e-5
    ours, theirs = (
        [r for r in stream_generate(m, processor, "Describe the image.", image=str(PHOTO), max_tokens=12)]
        for m in (model, plain)
    )  # decode steps: the bfloat16 kernel against MLX's float32 matmul
    assert [r.token for r in ours] == [r.token for r in theirs] and len(ours) == 12
    assert max(rel_err(a.logprobs, b.logprobs) for a, b in zip(ours, theirs)) <= 1e-5


def test_image_placeholder_count_checked(loaded):
    _, (model, _) = loaded
    with pytest.raises(ValueError, match="placeholder"):
        model.embed_prompt([1, IMAGE_PLACEHOLDER, 2], None)


def test_two_images_spliced_in_order(loaded):
    _, (model, _) = loaded
    n, hidden = model.config.num_image_tokens, model.config.text_args().hidden_size
    images = mx.stack([mx.full((n, hidden), 1.0), mx.full((n, hidden), 2.0)])
    out = model.embed_prompt([5, IMAGE_PLACEHOLDER, 6, 7, IMAGE_PLACEHOLDER, 8], images)
    assert out.shape == (4 + 2 * n, hidden)
    assert mx.all(out[1 : 1 + n] == 1.0).item() and mx.all(out[3 + n : 3 + 2 * n] == 2.0).item()


def test_preprocessing_matches_apple_pipeline(loaded, reference):
    """expand2square + transformers' CLIPImageProcessor (PIL path), as Apple's predict.py, computed by the fixture
    script."""
    from conftest import PHOTO

    _, (_, processor) = loaded
    arrays, _ = reference
    assert processor.image_size == 256
    assert mx.abs(processor.preprocess(PHOTO) - arrays["pixels"]).max().item() <= 1e-6


@requires_cpu_layer
def test_channels_last_layout_matches_reference(loaded, reference, monkeypatch):
    """The CPU tower in the GPU's layout (conv stages channels-last, native depthwise convs) gives the reference
    numbers too (the plain tower, which a GPU runs, is channels-last throughout)."""
    _, (model, _) = loaded
    arrays, meta = reference
    n = meta["num_image_tokens"]
    for impl in ("native", "toeplitz"):
        monkeypatch.setenv("FASTVLM_MLX_DEPTHWISE", impl)
        features = model.vision_tower(arrays["pixels"], channels_first=False)
        assert rel_err(features.reshape(1, n, -1), arrays["vision_features"]) <= VISION_TOL, impl


@requires_cpu_layer
def test_cpu_tower_without_the_c_kernels_matches_reference(loaded, reference, monkeypatch):
    """Where the C kernels cannot run, the CPU tower computes with MLX ops (the Toeplitz depthwise convs,
    MLX attention, the RepMixer blocks over two CPU streams or one): the reference numbers every way."""
    from fastvlm_mlx.cpu import attention, mlp

    _, (model, _) = loaded
    arrays, meta = reference
    n = meta["num_image_tokens"]
    with_kernels = model.vision_tower(arrays["pixels"])
    monkeypatch.setattr(attention, "_kernel", False)
    monkeypatch.setattr(mlp, "_kernel", False)
    monkeypatch.setenv("FASTVLM_MLX_DEPTHWISE", "toeplitz")
    both = model.vision_tower(arrays["pixels"])
    monkeypatch.setenv("FASTVLM_MLX_CPU_STREAMS", "1")
    single = model.vision_tower(arrays["pixels"])
    # the same ops on the same numbers; only the BLAS's thread count differs, which may reorder its sums
    assert rel_err(both, single) <= 1e-5
    for features in (with_kernels, both):
        assert rel_err(features.reshape(1, n, -1), arrays["vision_features"]) <= VISION_TOL
