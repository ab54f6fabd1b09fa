"""FastViTHD, the FastVLM vision encoder (paper section 3.2), in mlx.nn: inference form, NHWC.

Released checkpoints hold only the reparameterized network: every MobileOne / RepMixer / RepCPE
branch is already fused into one conv, and the converter also folds the ConvFFN BatchNorm into its
depthwise conv and stores 1x1 convs as Linear weights.  So each block is a few convs, matmuls and
GELUs.  Block and field names follow the paper and timm's ``fastvit.py``.

This is the model as every backend computes it.  On a Linux CPU in float32, ``fastvlm_mlx.cpu``
swaps the tower for a variant with the same weights that schedules the same maths for the CPU.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn


@dataclass
class VisionConfig:
    """Shape of a FastViTHD tower; the defaults are the published FastVLM encoder."""

    layers: list[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    embed_dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    mlp_ratio: float = 4.0
    token_mixers: list[str] = field(
        default_factory=lambda: ["repmixer", "repmixer", "repmixer", "attention", "attention"]
    )
    pos_embs: list[bool] = field(default_factory=lambda: [False, False, False, True, True])
    head_dim: int = 32
    se_ratio: float = 0.0625
    image_size: int = 1024
    patch_size: int = 64

    def __post_init__(self):
        n = len(self.layers)
        if not (len(self.embed_dims) == len(self.token_mixers) == len(self.pos_embs) == n):
            raise ValueError("vision config: layers, embed_dims, token_mixers and pos_embs differ in length")
        unknown = set(self.token_mixers) - {"repmixer", "attention"}
        if unknown:
            raise ValueError(f"vision config: unknown token mixer(s) {sorted(unknown)}")

    @property
    def out_dim(self) -> int:
        """Channels of the image embeddings (3072 for FastViTHD): the final conv doubles the last width."""
        return 2 * self.embed_dims[-1]

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def depthwise_conv(channels: int, kernel_size: int, stride: int = 1, multiplier: int = 1) -> nn.Conv2d:
    """k x k conv with one group per input channel ('same' padding); weight (C * multiplier, k, k, 1)."""
    return nn.Conv2d(channels, channels * multiplier, kernel_size, stride, kernel_size // 2, groups=channels)


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv (BatchNorm folded in), then a pointwise GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.conv = depthwise_conv(dim, 7)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """Conv-stage block: RepMixer token mixing, then a ConvFFN with a layer scale.

    The reparameterized mixer is one depthwise 3x3 conv that already contains its identity branch,
    so the block has no residual around it.
    """

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = depthwise_conv(dim, 3)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.mlp(x)


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions (row-major, as PyTorch flattens)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        qkv = self.qkv(x.reshape(b, h * w, c)).reshape(b, h * w, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, h, w, c))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with layer scales; LayerNorm over channels (eps 1e-5)."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.token_mixer = Attention(dim, head_dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = mx.ones((dim,))
        self.layer_scale_2 = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.mlp(x)


class PatchEmbed(nn.Module):
    """Stride-2 downsampling between stages: a large-kernel depthwise conv that widens, then a 1x1 conv."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"patch embed {in_dim}->{out_dim}: output must be a multiple of the input width")
        self.conv = depthwise_conv(in_dim, 7, stride=2, multiplier=out_dim // in_dim)
        self.pointwise = nn.Linear(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.pointwise(nn.gelu(self.conv(x))))


class RepCPE(nn.Conv2d):
    """Conditional positional encoding: a depthwise 7x7 conv whose identity branch is folded in."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 7, 1, 3, groups=dim)


class Stem(nn.Module):
    """3x3 s2 conv, 3x3 s2 depthwise conv, 1x1 conv, each followed by GELU: 4x downsampling."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = [nn.Conv2d(3, dim, 3, stride=2, padding=1), depthwise_conv(dim, 3, stride=2), nn.Linear(dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = nn.gelu(layer(x))
        return x


class SqueezeExcite(nn.Module):
    """Channel gating from the mean over the whole feature map (so it depends on the resolution)."""

    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.reduce = nn.Linear(dim, reduced)
        self.expand = nn.Linear(reduced, dim)

    def __call__(self, x: mx.array) -> mx.array:
        s = mx.mean(x, axis=(1, 2), keepdims=True)
        return x * mx.sigmoid(self.expand(nn.relu(self.reduce(s))))


class FinalConv(nn.Module):
    """conv_exp: a 3x3 depthwise conv that doubles the width, squeeze-excite, GELU."""

    def __init__(self, dim: int, se_ratio: float):
        super().__init__()
        self.conv = depthwise_conv(dim, 3, multiplier=2)
        self.se = SqueezeExcite(2 * dim, int(2 * dim * se_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.se(self.conv(x)))


class Stage(nn.Module):
    """Downsampling (all but the first stage), an optional RepCPE, then the stage's blocks."""

    def __init__(self, config: VisionConfig, index: int):
        super().__init__()
        dim = config.embed_dims[index]
        self.downsample = PatchEmbed(config.embed_dims[index - 1], dim) if index > 0 else None
        self.pos_emb = RepCPE(dim) if config.pos_embs[index] else None
        if config.token_mixers[index] == "attention":
            self.blocks = [AttentionBlock(dim, config.mlp_ratio, config.head_dim) for _ in range(config.layers[index])]
        else:
            self.blocks = [RepMixerBlock(dim, config.mlp_ratio) for _ in range(config.layers[index])]

    @property
    def has_attention(self) -> bool:
        return isinstance(self.blocks[0], AttentionBlock)

    def __call__(self, x: mx.array) -> mx.array:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_emb is not None:
            x = self.pos_emb(x)
        for block in self.blocks:
            x = block(x)
        return x


class FastViTHD(nn.Module):
    """Image (B, S, S, 3) in [0, 1] -> image embeddings (B, S/64, S/64, 2 * embed_dims[-1])."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.stem = Stem(config.embed_dims[0])
        self.stages = [Stage(config, i) for i in range(len(config.layers))]
        self.final_conv = FinalConv(config.embed_dims[-1], config.se_ratio)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype pixels should be given in (that of the weights)."""
        return self.stem.layers[0].weight.dtype

    def parts(self):
        """The tower as (name, fn) steps, each taking what the previous returns (for per-stage profiles)."""
        return (
            [("stem", self.stem)]
            + [(f"stage{i}", s) for i, s in enumerate(self.stages)]
            + [("final_conv", self.final_conv)]
        )

    def __call__(self, pixels: mx.array) -> mx.array:
        x = pixels
        for _, step in self.parts():
            x = step(x)
        return x
