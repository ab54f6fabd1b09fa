"""FastViTHD and the projector as scheduled for the CPU: same weights, same maths, another execution.

``CpuFastViTHD`` walks the plain tower's blocks (``fastvlm_mlx.vision``) and computes each with:
- depthwise convs from ``depthwise.depthwise_conv2d`` (the compiled ``depthwise.c``);
- the conv stages channels-first (NCHW), where those convs and the 1x1 convs (``weight @ x``) need
  no transposes, the stem's 3x3 conv as one im2col GEMM;
- the pointwise MLP, GELU and residual of each block from ``mlp.fused_mlp`` (the compiled ``mlp.c``),
  attention from ``kernels`` (the compiled ``attention.c``), GELU elsewhere from ``kernels``;
- where ``mlp.c`` cannot run (no C compiler or optimized BLAS), each conv-stage block split over two MLX
  CPU streams: MLX runs each stream on its own thread, and its CPU reductions, fused elementwise kernels
  and small matmuls are single-threaded.  The block's GEMMs then run with one BLAS thread per stream
  (``FASTVLM_MLX_CPU_STREAMS=1`` keeps one stream).

The attention stages, the final conv and the output stay channels-last, as in the plain tower.
"""

import os
import threading

import mlx.core as mx
import mlx.nn as nn

from ..model import Projector
from ..vision import AttentionBlock, FastViTHD, FinalConv, PatchEmbed, RepMixerBlock, Stage, Stem
from . import mlp
from .blas import blas_threads
from .depthwise import computes_channels_first, depthwise_conv2d, to_channels_first, to_channels_last
from .formulas import attention, gelu

_STREAMS_ENV = "FASTVLM_MLX_CPU_STREAMS"


_per_thread = threading.local()


def _second_cpu_stream() -> mx.Stream:
    """MLX streams belong to the thread that made them, so each thread (the server's generation thread,
    a batch worker) gets its own second stream."""
    if not hasattr(_per_thread, "stream"):
        _per_thread.stream = mx.new_stream(mx.cpu)
    return _per_thread.stream


def blocks_in_two_streams(channels_first: bool) -> bool:
    """Whether the conv stages' blocks run as two halves in two CPU streams: channels-first, unless
    FASTVLM_MLX_CPU_STREAMS=1 or ``mlp.c`` computes their MLPs on every core."""
    return channels_first and os.environ.get(_STREAMS_ENV, "2").strip() != "1" and mlp.kernel() is None


# ------------------------------------------------------------------------------- layout helpers
def per_channel(v: mx.array, channels_first: bool) -> mx.array:
    """A (C,) vector shaped to broadcast over the channel axis of either layout."""
    return v[:, None, None] if channels_first else v


def depthwise(conv: nn.Conv2d, x: mx.array, channels_first: bool, channels: slice = slice(None)) -> mx.array:
    """A depthwise ``nn.Conv2d`` in x's layout; ``channels`` picks the filters of an input holding only those."""
    out = depthwise_conv2d(x, conv.weight[channels], conv.stride[0], channels_first)
    return out + per_channel(conv.bias[channels], channels_first)


def pointwise(layer: nn.Linear, x: mx.array, channels_first: bool) -> mx.array:
    """A 1x1 conv stored as a Linear, over the channel axis of either layout (NCHW: weight @ (C, H*W))."""
    if not channels_first:
        return layer(x)
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    y = mx.addmm(layer.bias[:, None], layer.weight, flat) if "bias" in layer else layer.weight @ flat
    return y.reshape(b, -1, h, w)


def _conv3x3_s2_channels_first(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """The stem's dense 3x3 stride-2 conv from an NHWC image straight to NCHW output, as one GEMM over
    9*C_in-row patches (transposing the conv's NHWC output instead costs more than the conv)."""
    b, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    hp, wp = 2 * ho + 1, 2 * wo + 1
    xp = mx.pad(to_channels_first(x), [(0, 0), (0, 0), (1, hp - h - 1), (1, wp - w - 1)])
    patches = mx.as_strided(xp, (b, c, 3, 3, ho, wo), (c * hp * wp, hp * wp, wp, 1, 2 * wp, 2), 0)
    weight = conv.weight.transpose(0, 3, 1, 2).reshape(conv.weight.shape[0], c * 9)  # (O, C*3*3)
    out = mx.addmm(conv.bias[:, None], weight, patches.reshape(b, c * 9, ho * wo))
    return out.reshape(b, -1, ho, wo)


# ------------------------------------------------------------------------------------- blocks
def stem(block: Stem, x: mx.array, channels_first: bool) -> mx.array:
    """NHWC image in; the layout asked for out."""
    conv, dw, linear = block.layers
    x = gelu(_conv3x3_s2_channels_first(conv, x) if channels_first else conv(x))
    x = gelu(depthwise(dw, x, channels_first))
    return gelu(pointwise(linear, x, channels_first))


def conv_ffn_residual(ffn, x: mx.array, scale: mx.array, channels_first: bool) -> mx.array:
    """``x + scale * ConvFFN(x)``, the second half of RepMixer and attention blocks: its pointwise MLP and
    the residual in ``mlp.c`` where that runs."""
    conved = depthwise(ffn.conv, x, channels_first)
    out = mlp.fused_mlp(conved, x, ffn.fc1, ffn.fc2, scale, channels_last=not channels_first)
    if out is not None:
        return out
    y = pointwise(ffn.fc2, gelu(pointwise(ffn.fc1, conved, channels_first)), channels_first)
    return x + per_channel(scale, channels_first) * y


def repmixer_block(block: RepMixerBlock, x: mx.array, channels_first: bool) -> mx.array:
    if blocks_in_two_streams(channels_first):
        return _repmixer_block_in_two_streams(block, x)
    x = depthwise(block.token_mixer, x, channels_first)
    return conv_ffn_residual(block.mlp, x, block.layer_scale, channels_first)


def _repmixer_block_in_two_streams(block: RepMixerBlock, x: mx.array) -> mx.array:
    """The block (NCHW) as two halves, one per CPU stream: the depthwise convs by channel halves, the
    pointwise MLP and residual by halves of the H*W columns.  Same ops on the same numbers, so the
    output is identical; meant to run with one BLAS thread per stream (see ``stage``)."""
    b, c, h, w = x.shape
    streams = (mx.default_stream(mx.cpu), _second_cpu_stream())
    mixed, conved = [], []
    for stream, part in zip(streams, (slice(0, c // 2), slice(c // 2, c))):
        with mx.stream(stream):
            m = depthwise(block.token_mixer, x[:, part], True, part)
            mixed.append(m)
            conved.append(depthwise(block.mlp.conv, m, True, part))
    mixed = mx.concatenate(mixed, axis=1).reshape(b, c, h * w)
    conved = mx.concatenate(conved, axis=1).reshape(b, c, h * w)
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    out = []
    for stream, cols in zip(streams, (slice(0, h * w // 2), slice(h * w // 2, h * w))):
        with mx.stream(stream):
            hidden = gelu(mx.addmm(fc1.bias[:, None], fc1.weight, conved[..., cols]))
            y = mx.addmm(fc2.bias[:, None], fc2.weight, hidden)
            out.append(mixed[..., cols] + block.layer_scale[:, None] * y)
    return mx.concatenate(out, axis=-1).reshape(b, c, h, w)


def attention_block(block: AttentionBlock, x: mx.array) -> mx.array:
    """NHWC; ``formulas.attention`` spreads the heads over the cores itself."""
    attn = block.token_mixer
    b, h, w, c = x.shape
    qkv = attn.qkv(block.norm(x).reshape(b, h * w, c))
    qkv = qkv.reshape(b, h * w, 3, attn.num_heads, -1).transpose(2, 0, 3, 1, 4)
    out = attention(qkv[0], qkv[1], qkv[2], attn.scale)
    x = x + block.layer_scale_1 * attn.proj(out.transpose(0, 2, 1, 3).reshape(b, h, w, c))
    return conv_ffn_residual(block.mlp, x, block.layer_scale_2, False)


def patch_embed(block: PatchEmbed, x: mx.array, channels_first: bool) -> mx.array:
    return gelu(pointwise(block.pointwise, gelu(depthwise(block.conv, x, channels_first)), channels_first))


def stage(block: Stage, x: mx.array, channels_first: bool) -> mx.array:
    if block.downsample is not None:
        x = patch_embed(block.downsample, x, channels_first)
    if block.pos_emb is not None:
        x = depthwise(block.pos_emb, x, channels_first)
    if block.has_attention:
        for b in block.blocks:
            x = attention_block(b, x)
        return x
    if blocks_in_two_streams(channels_first):
        # The blocks run as two halves in two streams; their GEMMs must run with one BLAS thread each,
        # so they are evaluated here, inside that setting (two streams of multi-threaded GEMMs would fight for the
        # cores).
        mx.eval(x)
        with blas_threads(1):
            for b in block.blocks:
                x = repmixer_block(b, x, channels_first)
            mx.eval(x)
        return x
    for b in block.blocks:
        x = repmixer_block(b, x, channels_first)
    return x


def final_conv(block: FinalConv, x: mx.array) -> mx.array:
    return gelu(block.se(depthwise(block.conv, x, False)))


class CpuFastViTHD(FastViTHD):
    """``FastViTHD`` with the CPU schedule above; ``fastvlm_mlx.cpu.install`` turns a loaded tower into one."""

    def parts(self, channels_first: bool | None = None):
        """(name, fn) steps as the plain tower's.  ``channels_first`` picks the conv-stage layout; by default
        that of the depthwise path in use (NCHW for the Toeplitz matmuls)."""
        if channels_first is None:
            channels_first = computes_channels_first()
        steps = [("stem", lambda x: stem(self.stem, x, channels_first))]
        layout_first = channels_first
        for i, s in enumerate(self.stages):
            stage_first = layout_first and not s.has_attention
            steps.append((f"stage{i}", self._stage_step(s, stage_first, to_last=layout_first and not stage_first)))
            layout_first = stage_first
        tail = to_channels_last if layout_first else (lambda x: x)
        steps.append(("final_conv", lambda x: final_conv(self.final_conv, tail(x))))
        return steps

    @staticmethod
    def _stage_step(s: Stage, channels_first: bool, to_last: bool):
        return lambda x: stage(s, to_channels_last(x) if to_last else x, channels_first)

    def __call__(self, pixels: mx.array, channels_first: bool | None = None) -> mx.array:
        """Several images go through one at a time: at 1024 px one image already makes every GEMM large,
        and several images in one pass take longer per image (their activations outgrow the caches)."""
        if pixels.shape[0] > 1:
            features = []
            for i in range(pixels.shape[0]):
                features.append(self(pixels[i : i + 1], channels_first))
                mx.eval(features[-1])
            return mx.concatenate(features)
        x = pixels
        for _, step in self.parts(channels_first):
            x = step(x)
        return x


class CpuProjector(Projector):
    """The projector with the vectorized exact GELU."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(gelu(self.linear_1(x)))
