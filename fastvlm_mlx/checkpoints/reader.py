"""Any supported checkpoint directory -> (ModelConfig, MLX weights named after fastvlm_mlx's module tree).

The vision architecture is read off the tensors (Apple's config.json does not
describe it), the text architecture from config.json, and whether the LM head is
tied from the presence of ``lm_head.weight`` alone: Apple warns that the
``tie_word_embeddings`` field is sometimes wrong.
"""

import json
import re
from pathlib import Path

import mlx.core as mx

from ..errors import FastVLMError
from ..model import ModelConfig
from ..vision import VisionConfig
from .files import APPLE, FASTVLM_MLX, HF, MLXVLM, detect_format, read_config, read_weights
from .fold import fold_batchnorm, to_mlx_layout
from .keymap import to_mlx_names

_QWEN2_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_traditional",
    "rope_scaling",
)
_REQUIRED_TEXT = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "rms_norm_eps")
DEFAULT_IMAGE_SIZE = 1024


def _json_or_empty(file: Path) -> dict:
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except ValueError:
        raise FastVLMError(f"{file}: not valid JSON") from None


def _text_config(fmt: str, config: dict, weights: dict[str, mx.array], path: Path) -> dict:
    source = config.get("text_config") if fmt in (HF, MLXVLM) and config.get("text_config") else config
    text = {k: source[k] for k in _QWEN2_FIELDS if source.get(k) is not None}
    missing = [k for k in _REQUIRED_TEXT if k not in text]
    if missing:
        raise FastVLMError(f"{path}/config.json: missing language-model field(s) {', '.join(missing)}")
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    rope = source.get("rope_parameters")  # transformers 5 moved rope_theta here
    if "rope_theta" not in text and isinstance(rope, dict) and rope.get("rope_theta"):
        text["rope_theta"] = rope["rope_theta"]
    embed = weights.get("language_model.model.embed_tokens.weight")
    if embed is None:
        raise FastVLMError(f"{path}: no token embedding tensor (embed_tokens.weight)")
    text["vocab_size"] = embed.shape[0]
    text["tie_word_embeddings"] = "language_model.lm_head.weight" not in weights
    return text


def _image_size(fmt: str, config: dict, path: Path) -> int:
    if fmt == APPLE:
        m = re.search(r"_(\d+)$", str(config.get("mm_vision_tower", "")))
        if m:
            return int(m.group(1))
    if fmt == MLXVLM and isinstance(config.get("vision_config"), dict) and config["vision_config"].get("image_size"):
        return int(config["vision_config"]["image_size"])
    processors = [
        _json_or_empty(path / "preprocessor_config.json"),
        _json_or_empty(path / "processor_config.json").get("image_processor") or {},
    ]
    for pre in processors:
        for field in ("crop_size", "size"):
            value = pre.get(field)
            if isinstance(value, dict):
                value = value.get("height") or value.get("shortest_edge")
            if isinstance(value, int):
                return value
    return DEFAULT_IMAGE_SIZE


def infer_vision_config(weights: dict[str, mx.array], image_size: int, head_dim: int = 32) -> VisionConfig:
    """FastViTHD's shape from its (renamed, MLX-layout) tensors."""
    stage_ids = sorted({int(m.group(1)) for k in weights for m in [re.match(r"vision_tower\.stages\.(\d+)\.", k)] if m})
    if (
        not stage_ids
        or stage_ids != list(range(len(stage_ids)))
        or "vision_tower.final_conv.conv.weight" not in weights
    ):
        raise FastVLMError("vision tower tensors are incomplete (stages or final conv missing)")
    layers, dims, mixers, pos_embs, ratios = [], [], [], [], set()
    for s in stage_ids:
        prefix = f"vision_tower.stages.{s}.blocks."
        blocks = {int(k[len(prefix) :].split(".")[0]) for k in weights if k.startswith(prefix)}
        if not blocks or blocks != set(range(len(blocks))):
            raise FastVLMError(f"vision tower stage {s}: blocks missing or not numbered 0..n-1")
        fc1 = weights.get(f"{prefix}0.mlp.fc1.weight")
        if fc1 is None:
            raise FastVLMError(f"vision tower stage {s}: block 0 has no mlp.fc1 weight")
        layers.append(len(blocks))
        dims.append(fc1.shape[1])
        ratios.add(fc1.shape[0] / fc1.shape[1])
        mixers.append("attention" if f"{prefix}0.token_mixer.qkv.weight" in weights else "repmixer")
        pos_embs.append(f"vision_tower.stages.{s}.pos_emb.weight" in weights)
    if len(ratios) != 1:
        raise FastVLMError(f"vision tower: MLP ratios differ between stages ({sorted(ratios)})")
    reduce = weights["vision_tower.final_conv.se.reduce.weight"]
    return VisionConfig(
        layers=layers,
        embed_dims=dims,
        mlp_ratio=ratios.pop(),
        token_mixers=mixers,
        pos_embs=pos_embs,
        head_dim=head_dim,
        se_ratio=reduce.shape[0] / reduce.shape[1],
        image_size=image_size,
    )


def input_width(weights: dict[str, mx.array], layer: str, quantization: dict | None) -> int:
    """A Linear layer's input width; a quantized layer packs 32 // bits weights into each uint32."""
    weight = weights[f"{layer}.weight"]
    if f"{layer}.scales" not in weights:
        return weight.shape[1]
    own = (quantization or {}).get(layer)
    bits = (own if isinstance(own, dict) else quantization or {}).get("bits")
    if not bits:
        raise FastVLMError(f"{layer} is quantized but config.json has no quantization bits")
    return weight.shape[1] * 32 // bits


def _eos_ids(config: dict, path: Path) -> list:
    ids = []
    sources = [config, config.get("text_config") or {}, _json_or_empty(path / "generation_config.json")]
    for source in sources:
        value = source.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, mx.array]]:
    """Read, rename, re-layout and fold any supported checkpoint; shapes are checked later by a strict load."""
    config = read_config(path)
    raw = read_weights(path)
    fmt = detect_format(config, raw.keys(), path)
    if fmt == FASTVLM_MLX:
        try:
            return ModelConfig.from_dict(config), raw
        except (KeyError, TypeError, ValueError) as e:
            raise FastVLMError(f"{path}/config.json: invalid fastvlm_mlx config ({e})") from None
    weights, _ = to_mlx_names(fmt, raw)
    weights = fold_batchnorm(to_mlx_layout(weights, torch_layout=fmt in (APPLE, HF)))
    vision_cfg = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    try:
        vision = infer_vision_config(weights, _image_size(fmt, config, path), vision_cfg.get("head_dim", 32))
        linear_1 = weights.get("projector.linear_1.weight")
        if linear_1 is None:
            raise FastVLMError(f"{path}: no projector tensors (mm_projector / multi_modal_projector)")
        model_config = ModelConfig(
            vision_config=vision,
            text_config=_text_config(fmt, config, weights, path),
            mm_hidden_size=input_width(weights, "projector.linear_1", config.get("quantization")),
            eos_token_id=_eos_ids(config, path),
            quantization=config.get("quantization"),
            source_format=fmt,
        )
    except (KeyError, ValueError) as e:
        raise FastVLMError(f"{path}: inconsistent checkpoint ({e})") from None
    return model_config, weights
