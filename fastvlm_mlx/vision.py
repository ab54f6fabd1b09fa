"""FastViTHD, the FastVLM vision encoder, in mlx.nn (NHWC, inference form).

Released checkpoints hold only the reparameterized network: every MobileOne /
RepMixer / RepCPE branch is already fused into one conv.  The converter also
folds the ConvFFN BatchNorm into its depthwise conv and stores 1x1 convs as
Linear weights, so at run time each block is a handful of convs, matmuls and
GELUs.  Block and field names follow the paper and timm's ``fastvit.py``.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn


@dataclass
class VisionConfig:
    """Shape of a FastViTHD tower; the defaults are the published FastVLM encoder."""

    layers: List[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    embed_dims: List[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    mlp_ratio: float = 4.0
    token_mixers: List[str] = field(
        default_factory=lambda: ["repmixer", "repmixer", "repmixer", "attention", "attention"]
    )
    pos_embs: List[bool] = field(default_factory=lambda: [False, False, False, True, True])
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


def depthwise_conv2d(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Grouped conv with one group per input channel ('same' padding, odd kernel).

    ``weight`` is (C * multiplier, k, k, 1).  Kept as one function so that a faster
    formulation can be chosen per backend in a single place.
    """
    pad = weight.shape[1] // 2
    return mx.conv2d(x, weight, stride=stride, padding=pad, groups=x.shape[-1])


class DepthwiseConv(nn.Module):
    """k x k conv with groups == in_channels; out_channels may be a multiple of in_channels."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, multiplier: int = 1):
        super().__init__()
        scale = 1.0 / kernel_size
        self.weight = mx.random.uniform(-scale, scale, (channels * multiplier, kernel_size, kernel_size, 1))
        self.bias = mx.zeros((channels * multiplier,))
        self.stride = stride

    def __call__(self, x: mx.array) -> mx.array:
        return depthwise_conv2d(x, self.weight, self.stride) + self.bias


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv (BatchNorm folded in), then a pointwise GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.conv = DepthwiseConv(dim, 7)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """Conv stage block.  The reparameterized mixer already contains its identity, so it has no residual."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = DepthwiseConv(dim, 3)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.mlp(x)


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions (row-major, as the PyTorch flatten)."""

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
        qkv = self.qkv(x.reshape(b, h * w, c))
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return self.proj(out)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with layer scales; the norm is LayerNorm over channels (eps 1e-5)."""

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
    """Stride-2 downsampling between stages: large-kernel depthwise conv doubling the width, then a 1x1 conv."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"patch embed {in_dim}->{out_dim}: output must be a multiple of the input width")
        self.conv = DepthwiseConv(in_dim, 7, stride=2, multiplier=out_dim // in_dim)
        self.pointwise = nn.Linear(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.pointwise(nn.gelu(self.conv(x))))


class Stem(nn.Module):
    """3x3 s2 conv, 3x3 s2 depthwise conv, 1x1 conv, each followed by GELU: 4x downsampling."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = [nn.Conv2d(3, dim, 3, stride=2, padding=1), DepthwiseConv(dim, 3, stride=2), nn.Linear(dim, dim)]

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
    """conv_exp: 3x3 depthwise conv doubling the width, squeeze-excite, GELU."""

    def __init__(self, dim: int, se_ratio: float):
        super().__init__()
        self.conv = DepthwiseConv(dim, 3, multiplier=2)
        self.se = SqueezeExcite(2 * dim, int(2 * dim * se_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.se(self.conv(x)))


class Stage(nn.Module):
    def __init__(self, config: VisionConfig, index: int):
        super().__init__()
        dim = config.embed_dims[index]
        self.downsample = PatchEmbed(config.embed_dims[index - 1], dim) if index > 0 else None
        self.pos_emb = DepthwiseConv(dim, 7) if config.pos_embs[index] else None
        if config.token_mixers[index] == "attention":
            self.blocks = [AttentionBlock(dim, config.mlp_ratio, config.head_dim) for _ in range(config.layers[index])]
        else:
            self.blocks = [RepMixerBlock(dim, config.mlp_ratio) for _ in range(config.layers[index])]

    def __call__(self, x: mx.array) -> mx.array:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_emb is not None:
            x = self.pos_emb(x)  # RepCPE: its identity is folded into the conv
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

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x)
        return self.final_conv(x)
