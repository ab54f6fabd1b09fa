"""FastViTHD, the FastVLM vision encoder, in mlx.nn (inference form).

Released checkpoints hold only the reparameterized network: every MobileOne /
RepMixer / RepCPE branch is already fused into one conv.  The converter also
folds the ConvFFN BatchNorm into its depthwise conv and stores 1x1 convs as
Linear weights, so at run time each block is a handful of convs, matmuls and
GELUs.  Block and field names follow the paper and timm's ``fastvit.py``.

Images come in and embeddings go out channels-last (NHWC).  On the CPU four
things differ from the GPU path, each behind one function and each tested
against the plain one: depthwise convs run as BLAS matmuls
(``depthwise_conv2d``), the conv stages run channels-first so that those
matmuls need no transposes (``FastViTHD.parts``), GELU and the attention
softmax use vectorizable fused math (``cpu_math.gelu``, ``cpu_math.attention``),
and the work is split over two CPU streams: the attention heads
(``in_two_streams``) and each conv-stage block, whose GEMMs then run with one
BLAS thread per stream (``RepMixerBlock._in_two_streams``, ``Stage``).
"""

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import blas_threads
from .cpu_math import attention, gelu


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


def _depthwise_native(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """MLX's grouped conv (NHWC): the right choice on Metal/CUDA, but under 1 GFLOP/s on the CPU."""
    pad = weight.shape[1] // 2
    return mx.conv2d(x, weight, stride=stride, padding=pad, groups=x.shape[-1])


def _depthwise_shift(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Sum of k*k shifted, per-channel-scaled slices of the padded NHWC input (exact; meant for mx.compile)."""
    b, h, w, c = x.shape
    cm, k = weight.shape[0], weight.shape[1]
    m, p = cm // c, k // 2
    if m > 1:
        x = mx.repeat(x, m, axis=-1)  # output channel c*m + r reads input channel c
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    taps = weight.reshape(cm, k * k).T  # (k*k, C*m)
    out = None
    for i in range(k):
        for j in range(k):
            win = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            term = win * taps[i * k + j]
            out = term if out is None else out + term
    return out


def _toeplitz_tile(stride: int, out_width: int) -> int:
    """Output columns per matmul row.  Measured at the FastViTHD shapes (NCHW, 2-core x86): 16 is 1.2-1.5x
    faster than 8 for stride-1 convs over 64-128 columns; 8 is best elsewhere (32 is slower everywhere)."""
    return 16 if stride == 1 and 64 <= out_width <= 128 else 8


@lru_cache(maxsize=None)
def _toeplitz_pattern(k: int, tile: int, stride: int):
    """Which kernel column feeds (input column a, output column t) of one tile, and whether any does."""
    span = stride * (tile - 1) + k
    col = np.arange(span)[:, None] - stride * np.arange(tile)[None, :]
    valid = (col >= 0) & (col < k)
    return np.where(valid, col, 0).reshape(-1).astype(np.int32), valid


def _toeplitz_weights(weight: mx.array, channels: int, tile: int, stride: int) -> mx.array:
    """(C*m, k, k, 1) -> (C, k, span, m*tile): per channel and kernel row, the banded matrix of one row tile."""
    cm, k = weight.shape[0], weight.shape[1]
    m = cm // channels
    span = stride * (tile - 1) + k
    index, valid = _toeplitz_pattern(k, tile, stride)
    w = weight.reshape(channels, m, k, k)
    band = mx.take(w, mx.array(index), axis=3).reshape(channels, m, k, span, tile)
    band = mx.where(mx.array(valid), band, mx.zeros((), dtype=weight.dtype))
    return band.transpose(0, 2, 3, 1, 4).reshape(channels, k, span, m * tile)


def _depthwise_toeplitz(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Depthwise conv of an NCHW input as k batched matmuls, one batch entry per channel (the CPU path).

    Each output row is cut into tiles of T columns; a tile is (input tile of s*(T-1)+k columns) @ (banded
    Toeplitz matrix of one kernel row), and the k kernel rows are k row-shifted views of the same gathered
    tiles, accumulated with addmm.  The matmuls do (s*(T-1)+k)/k times the direct FLOPs (2x at k=7, T=8)
    but run in BLAS, 10-20x faster than MLX's CPU grouped conv.  Same sums, different order: agrees with
    mx.conv2d to a few 1e-7 relative.
    """
    b, c, h, w = x.shape
    cm, k = weight.shape[0], weight.shape[1]
    m, p, s = cm // c, k // 2, stride
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    t = _toeplitz_tile(s, wo)
    tiles = -(-wo // t)
    span = s * (t - 1) + k
    wp = s * t * (tiles - 1) + span  # padded width the tiles read
    hp = -(-(h + 2 * p) // s) * s  # padded height, a multiple of the stride
    right = wp - w - p
    if right < 0:  # trailing input columns no output reads
        x, right = x[..., : w + right], 0
    xp = mx.pad(x, [(0, 0), (0, 0), (p, hp - h - p), (p, right)])  # (B, C, hp, wp)
    bands = _toeplitz_weights(weight, c, t, s)  # (C, k, span, m*T)
    if b > 1:
        bands = mx.broadcast_to(bands[None], (b,) + bands.shape).reshape((b * c,) + bands.shape[1:])
    rows = hp // s
    # One gathered copy per row phase (stride 2 reads even and odd padded rows separately).
    phases = [
        mx.contiguous(mx.as_strided(xp, (b, c, rows, tiles, span), (c * hp * wp, hp * wp, s * wp, s * t, 1), ph * wp))
        for ph in range(s)
    ]
    out = None
    for i in range(k):
        r0 = i // s
        a = phases[i % s][:, :, r0 : r0 + ho].reshape(b * c, ho * tiles, span)
        out = a @ bands[:, i] if out is None else mx.addmm(out, a, bands[:, i])
    if m == 1:
        out = out.reshape(b, c, ho, tiles * t)
    else:  # the m output channels of input channel c are interleaved per tile: (c, row, tile, r, t) -> (c*m + r, ...)
        out = out.reshape(b, c, ho, tiles, m, t).transpose(0, 1, 4, 2, 3, 5).reshape(b, cm, ho, tiles * t)
    return out[..., :wo] if tiles * t != wo else out


# Each path with the layout it computes in (True: NCHW).
_DEPTHWISE_IMPLS = {
    "native": (_depthwise_native, False),
    "shift": (mx.compile(_depthwise_shift), False),
    "toeplitz": (mx.compile(_depthwise_toeplitz), True),
}

# FASTVLM_MLX_DEPTHWISE=native|shift|toeplitz forces one path (for tests and benchmarks); default: per device.
_DEPTHWISE_ENV = "FASTVLM_MLX_DEPTHWISE"


def depthwise_impl() -> str:
    """The depthwise-conv path used now: the native grouped conv on a GPU, the Toeplitz matmuls on the CPU."""
    forced = os.environ.get(_DEPTHWISE_ENV, "").strip().lower()
    if forced in _DEPTHWISE_IMPLS:
        return forced
    return "native" if mx.default_device() == mx.gpu else "toeplitz"


def _to_channels_first(x: mx.array) -> mx.array:
    return x.transpose(0, 3, 1, 2)


def _to_channels_last(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


def depthwise_conv2d(
    x: mx.array, weight: mx.array, stride: int = 1, channels_first: bool = False, impl: Optional[str] = None
) -> mx.array:
    """Grouped conv with one group per input channel ('same' padding, odd kernel), in x's layout.

    ``weight`` is (C * multiplier, k, k, 1).  Every depthwise conv of the tower goes through here, so the
    formulation is chosen per backend in this one place (see ``depthwise_impl``); ``impl`` forces one.
    A path computing in the other layout gets x transposed there and back.
    """
    fn, impl_channels_first = _DEPTHWISE_IMPLS[impl or depthwise_impl()]
    if impl_channels_first == channels_first:
        return fn(x, weight, stride)
    if channels_first:
        return _to_channels_first(fn(_to_channels_last(x), weight, stride))
    return _to_channels_last(fn(_to_channels_first(x), weight, stride))


def pointwise(layer: nn.Linear, x: mx.array, channels_first: bool) -> mx.array:
    """A 1x1 conv stored as a Linear, over the channel axis of either layout (NCHW: weight @ (C, H*W))."""
    if not channels_first:
        return layer(x)
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    y = mx.addmm(layer.bias[:, None], layer.weight, flat) if "bias" in layer else layer.weight @ flat
    return y.reshape(b, -1, h, w)


def per_channel(v: mx.array, channels_first: bool) -> mx.array:
    """A (C,) vector shaped to broadcast over the channel axis of either layout."""
    return v[:, None, None] if channels_first else v


# MLX runs each CPU stream on its own thread, and its CPU reductions, fused elementwise kernels and the
# depthwise convs' small matmuls are single-threaded, so on the CPU work is split in two halves, one per
# stream: the attention heads (a stage-3 attention: 140-160 -> 118-133 ms), and each conv-stage block,
# whose GEMMs then run with one BLAS thread per stream (``RepMixerBlock``, ``Stage``).
# FASTVLM_MLX_CPU_STREAMS=1 turns this off.
_STREAMS_ENV = "FASTVLM_MLX_CPU_STREAMS"


@lru_cache(maxsize=None)
def _second_cpu_stream() -> mx.Stream:
    return mx.new_stream(mx.cpu)


def two_cpu_streams() -> bool:
    """Whether work is split over two CPU streams now (on the CPU, unless FASTVLM_MLX_CPU_STREAMS=1)."""
    return mx.default_device() == mx.cpu and os.environ.get(_STREAMS_ENV, "2").strip() != "1"


def in_two_streams(fn, *arrays: mx.array, axis: int) -> mx.array:
    """``fn(*arrays)`` for an ``fn`` that is independent along ``axis``: on the CPU, each half in its own stream."""
    n = arrays[0].shape[axis]
    if n < 2 or not two_cpu_streams():
        return fn(*arrays)
    half = n // 2
    first = fn(*(mx.split(a, [half], axis=axis)[0] for a in arrays))
    with mx.stream(_second_cpu_stream()):
        second = fn(*(mx.split(a, [half], axis=axis)[1] for a in arrays))
    return mx.concatenate([first, second], axis=axis)


class DepthwiseConv(nn.Module):
    """k x k conv with groups == in_channels; out_channels may be a multiple of in_channels."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, multiplier: int = 1):
        super().__init__()
        scale = 1.0 / kernel_size
        self.weight = mx.random.uniform(-scale, scale, (channels * multiplier, kernel_size, kernel_size, 1))
        self.bias = mx.zeros((channels * multiplier,))
        self.stride = stride

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        out = depthwise_conv2d(x, self.weight, self.stride, channels_first)
        return out + per_channel(self.bias, channels_first)


def _depthwise_part(conv: "DepthwiseConv", x: mx.array, channels: slice) -> mx.array:
    """``conv`` (multiplier 1) applied to the given channel range of an NCHW input that holds only those channels."""
    out = depthwise_conv2d(x, conv.weight[channels], conv.stride, channels_first=True)
    return out + conv.bias[channels][:, None, None]


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv (BatchNorm folded in), then a pointwise GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.conv = DepthwiseConv(dim, 7)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        x = self.conv(x, channels_first)
        return pointwise(self.fc2, gelu(pointwise(self.fc1, x, channels_first)), channels_first)


class RepMixerBlock(nn.Module):
    """Conv stage block.  The reparameterized mixer already contains its identity, so it has no residual."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = DepthwiseConv(dim, 3)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = mx.ones((dim,))

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        if channels_first and two_cpu_streams():
            return self._in_two_streams(x)
        x = self.token_mixer(x, channels_first)
        return x + per_channel(self.layer_scale, channels_first) * self.mlp(x, channels_first)

    def _in_two_streams(self, x: mx.array) -> mx.array:
        """The same block (NCHW) as two halves, one per CPU stream: the depthwise convs by channel halves,
        the pointwise MLP and residual by halves of the H*W columns.  Same ops on the same numbers, so the
        output is identical; meant to run with one BLAS thread per stream (see ``Stage``)."""
        b, c, h, w = x.shape
        streams = (mx.default_stream(mx.cpu), _second_cpu_stream())
        mixed, conved = [], []
        for stream, part in zip(streams, (slice(0, c // 2), slice(c // 2, c))):
            with mx.stream(stream):
                m = _depthwise_part(self.token_mixer, x[:, part], part)
                mixed.append(m)
                conved.append(_depthwise_part(self.mlp.conv, m, part))
        mixed = mx.concatenate(mixed, axis=1).reshape(b, c, h * w)
        conved = mx.concatenate(conved, axis=1).reshape(b, c, h * w)
        out = []
        for stream, cols in zip(streams, (slice(0, h * w // 2), slice(h * w // 2, h * w))):
            with mx.stream(stream):
                hidden = gelu(mx.addmm(self.mlp.fc1.bias[:, None], self.mlp.fc1.weight, conved[..., cols]))
                y = mx.addmm(self.mlp.fc2.bias[:, None], self.mlp.fc2.weight, hidden)
                out.append(mixed[..., cols] + self.layer_scale[:, None] * y)
        return mx.concatenate(out, axis=-1).reshape(b, c, h, w)


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions (row-major, as the PyTorch flatten); NHWC."""

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
        out = in_two_streams(self._attend, qkv[0], qkv[1], qkv[2], axis=1)  # heads are independent
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return self.proj(out)

    def _attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return attention(q, k, v, self.scale)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with layer scales; the norm is LayerNorm over channels (eps 1e-5).  NHWC."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.token_mixer = Attention(dim, head_dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = mx.ones((dim,))
        self.layer_scale_2 = mx.ones((dim,))

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        if channels_first:
            raise ValueError("attention blocks run channels-last")
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

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        return gelu(pointwise(self.pointwise, gelu(self.conv(x, channels_first)), channels_first))


def _conv3x3_s2_channels_first(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """The stem's dense 3x3 stride-2 conv from an NHWC image straight to NCHW output, as one GEMM over
    9*C_in-row patches (transposing the conv's NHWC output instead costs 5x the conv)."""
    b, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    hp, wp = 2 * ho + 1, 2 * wo + 1
    xp = mx.pad(_to_channels_first(x), [(0, 0), (0, 0), (1, hp - h - 1), (1, wp - w - 1)])
    patches = mx.as_strided(xp, (b, c, 3, 3, ho, wo), (c * hp * wp, hp * wp, wp, 1, 2 * wp, 2), 0)
    weight = conv.weight.transpose(0, 3, 1, 2).reshape(conv.weight.shape[0], c * 9)  # (O, C*3*3)
    out = mx.addmm(conv.bias[:, None], weight, patches.reshape(b, c * 9, ho * wo))
    return out.reshape(b, -1, ho, wo)


class Stem(nn.Module):
    """3x3 s2 conv, 3x3 s2 depthwise conv, 1x1 conv, each followed by GELU: 4x downsampling.

    Takes the NHWC image; returns the layout asked for.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.layers = [nn.Conv2d(3, dim, 3, stride=2, padding=1), DepthwiseConv(dim, 3, stride=2), nn.Linear(dim, dim)]

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        conv, depthwise, linear = self.layers
        x = gelu(_conv3x3_s2_channels_first(conv, x) if channels_first else conv(x))
        x = gelu(depthwise(x, channels_first))
        return gelu(pointwise(linear, x, channels_first))


class SqueezeExcite(nn.Module):
    """Channel gating from the mean over the whole feature map (so it depends on the resolution).  NHWC."""

    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.reduce = nn.Linear(dim, reduced)
        self.expand = nn.Linear(reduced, dim)

    def __call__(self, x: mx.array) -> mx.array:
        s = mx.mean(x, axis=(1, 2), keepdims=True)
        return x * mx.sigmoid(self.expand(nn.relu(self.reduce(s))))


class FinalConv(nn.Module):
    """conv_exp: 3x3 depthwise conv doubling the width, squeeze-excite, GELU.  NHWC."""

    def __init__(self, dim: int, se_ratio: float):
        super().__init__()
        self.conv = DepthwiseConv(dim, 3, multiplier=2)
        self.se = SqueezeExcite(2 * dim, int(2 * dim * se_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(self.se(self.conv(x)))


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

    @property
    def has_attention(self) -> bool:
        return isinstance(self.blocks[0], AttentionBlock)

    def __call__(self, x: mx.array, channels_first: bool = False) -> mx.array:
        if self.downsample is not None:
            x = self.downsample(x, channels_first)
        if self.pos_emb is not None:
            x = self.pos_emb(x, channels_first)  # RepCPE: its identity is folded into the conv
        if channels_first and two_cpu_streams() and not self.has_attention:
            # The blocks run as two halves in two streams (RepMixerBlock._in_two_streams); their GEMMs must
            # run with one BLAS thread each, so they are evaluated here, inside that setting:
            # 64x64x384 blocks 77 -> 68 ms, 128x128x192 blocks 101 -> 85 ms.
            mx.eval(x)
            with blas_threads(1):
                for block in self.blocks:
                    x = block(x, channels_first)
                mx.eval(x)
            return x
        for block in self.blocks:
            x = block(x, channels_first)
        return x


class FastViTHD(nn.Module):
    """Image (B, S, S, 3) in [0, 1] -> image embeddings (B, S/64, S/64, 2 * embed_dims[-1]).

    Inside, the conv stages run channels-first (NCHW) on the CPU, where the Toeplitz depthwise convs
    and the pointwise GEMMs then need no transposes (measured 15-25% faster per block), and
    channels-last (MLX's native conv layout) on a GPU.  The attention stages, the final conv and the
    output are channels-last in both.
    """

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

    def parts(self, channels_first: Optional[bool] = None):
        """The tower as (name, fn) steps, each taking and returning what the next expects (for profiling).

        ``channels_first`` picks the conv-stage layout; by default that of the device (see the class).
        """
        if channels_first is None:
            channels_first = _DEPTHWISE_IMPLS[depthwise_impl()][1]  # the layout the depthwise convs compute in
        steps = [("stem", lambda x: self.stem(x, channels_first))]
        layout_first = channels_first
        for i, stage in enumerate(self.stages):
            stage_first = layout_first and not stage.has_attention
            to_last = layout_first and not stage_first
            steps.append((f"stage{i}", self._stage_step(stage, stage_first, to_last)))
            layout_first = stage_first
        tail = _to_channels_last if layout_first else (lambda x: x)
        steps.append(("final_conv", lambda x: self.final_conv(tail(x))))
        return steps

    @staticmethod
    def _stage_step(stage: Stage, channels_first: bool, to_channels_last: bool):
        def step(x):
            return stage(_to_channels_last(x) if to_channels_last else x, channels_first)

        return step

    def __call__(self, pixels: mx.array, channels_first: Optional[bool] = None) -> mx.array:
        x = pixels
        for _, step in self.parts(channels_first):
            x = step(x)
        return x
