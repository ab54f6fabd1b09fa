"""The published sizes: full FastViTHD and the 0.5B / 1.5B / 7B decoders, with random weights."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from fastvlm_mlx.model import FastVLM, ModelConfig
from fastvlm_mlx.vision import FastViTHD, VisionConfig

# Qwen2 shapes (FORMATS.md section 7) and the parameter counts Qwen publishes for those models.
QWEN2 = {
    "0.5B": (
        dict(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
        ),
        True,
        494_032_768,
    ),
    "1.5B": (
        dict(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            vocab_size=151936,
        ),
        True,
        1_543_714_304,
    ),
    "7B": (
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
        False,
        7_615_616_512,
    ),
}


def count(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def test_fastvithd_parameter_count_matches_timm(reference):
    """timm's fastvit_mci3 count, less one BatchNorm (weight+bias) per ConvFFN, plus the conv bias it folds into."""
    _, meta = reference
    expected = meta["full_fastvithd_params_timm"] - meta["full_fastvithd_convffn_channels"]
    assert count(FastViTHD(VisionConfig())) == expected


def test_fastvithd_output_shape_at_small_resolution(reference):
    _, meta = reference
    tower = FastViTHD(VisionConfig())
    out = tower(mx.random.uniform(shape=(1, 128, 128, 3)))
    n, c, h, w = meta["full_fastvithd_forward_features_shape_128"]
    assert out.shape == (n, h, w, c)
    assert mx.all(mx.isfinite(out)).item()


@pytest.mark.parametrize("size", QWEN2)
def test_decoder_configs_build(size):
    """Built lazily (no weights are materialised), so even 7B costs nothing here."""
    text, tied, params = QWEN2[size]
    text = dict(text, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=tied)
    model = FastVLM(ModelConfig(vision_config=VisionConfig(), text_config=text, mm_hidden_size=3072))
    assert count(model.language_model) == params
    assert ("lm_head" in model.language_model) == (not tied)
    assert model.config.num_image_tokens == 256
    assert model.projector.linear_1.weight.shape == (text["hidden_size"], 3072)
