"""FastVLM assembled: FastViTHD -> mlp2x_gelu projector -> mlx-lm's Qwen2 decoder.

The decoder is mlx-lm's own ``qwen2.Model`` (its KV cache, generation loop and
quantization then work unchanged); this module only adds the image path and the
splice of image embeddings into the prompt.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from .vision import FastViTHD, VisionConfig

# Placeholder id for "image goes here" in token lists, as in Apple's llava code (never a real vocabulary id).
IMAGE_PLACEHOLDER = -200

FORMAT_NAME = "fastvlm_mlx"
FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored as this project's config.json."""

    vision_config: VisionConfig
    text_config: dict
    mm_hidden_size: int
    projector_type: str = "mlp2x_gelu"
    eos_token_id: list[int] = field(default_factory=list)
    quantization: dict | None = None
    source_format: str | None = None

    def __post_init__(self):
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported projector type {self.projector_type!r} (only mlp2x_gelu)")
        if self.mm_hidden_size != self.vision_config.out_dim:
            raise ValueError(
                f"projector input {self.mm_hidden_size} does not match the vision output {self.vision_config.out_dim}"
            )

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.vision_config.patch_size) ** 2

    def text_args(self) -> qwen2.ModelArgs:
        return qwen2.ModelArgs.from_dict({**self.text_config, "model_type": "qwen2"})

    def to_dict(self) -> dict:
        d = {
            "model_type": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vision_config": self.vision_config.to_dict(),
            "text_config": self.text_config,
            "mm_hidden_size": self.mm_hidden_size,
            "projector_type": self.projector_type,
            "eos_token_id": self.eos_token_id,
            "source_format": self.source_format,
        }
        if self.quantization:
            d["quantization"] = self.quantization
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(
            vision_config=VisionConfig.from_dict(d["vision_config"]),
            text_config=dict(d["text_config"]),
            mm_hidden_size=d["mm_hidden_size"],
            projector_type=d.get("projector_type", "mlp2x_gelu"),
            eos_token_id=list(d.get("eos_token_id") or []),
            quantization=d.get("quantization"),
            source_format=d.get("source_format"),
        )


class Projector(nn.Module):
    """mlp2x_gelu: Linear -> exact GELU -> Linear, from vision channels to the LLM width."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


class FastVLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = FastViTHD(config.vision_config)
        text_args = config.text_args()
        self.projector = Projector(config.mm_hidden_size, text_args.hidden_size)
        self.language_model = qwen2.Model(text_args)

    def encode_image(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) pixels in [0, 1] -> (B, (S/64)^2, hidden) embeddings ready for the decoder."""
        features = self.vision_tower(pixels)
        b, h, w, c = features.shape
        return self.projector(features.reshape(b, h * w, c))

    def embed_prompt(self, token_ids: Sequence[int], image_embeds: mx.array | None = None) -> mx.array:
        """Token embeddings of one prompt with each IMAGE_PLACEHOLDER replaced by one image's embeddings.

        ``image_embeds`` is (num_images, N, hidden), in the order the placeholders appear.
        Returns (length, hidden) where each placeholder became N positions.
        """
        ids = list(token_ids)
        slots = [i for i, t in enumerate(ids) if t == IMAGE_PLACEHOLDER]
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if len(slots) != n_images:
            raise ValueError(f"prompt has {len(slots)} image placeholder(s) but {n_images} image(s) were given")
        embed = self.language_model.model.embed_tokens
        dtype = self.language_model.model.norm.weight.dtype  # the embedding table may be quantized
        pieces, start = [], 0
        for k, slot in enumerate(slots + [len(ids)]):
            if slot > start:
                pieces.append(embed(mx.array(ids[start:slot])))
            if k < n_images:
                pieces.append(image_embeds[k].astype(dtype))
            start = slot + 1
        return mx.concatenate(pieces, axis=0)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        """The decoder step; mlx-lm's generation loop calls the model through this."""
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    @property
    def layers(self):
        """Decoder layers, which mlx-lm's make_prompt_cache sizes its KV cache from."""
        return self.language_model.layers
