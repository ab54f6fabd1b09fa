"""Weight layout for MLX and BatchNorm folding, applied to tensors already renamed by keymap.

PyTorch convs are OIHW, MLX convs OHWI; 1x1 convs become Linear matrices (the
runtime runs them as matmuls on NHWC); layer scales (C,1,1) become (C,).  The
ConvFFN BatchNorm that the released checkpoints keep separate is folded into the
depthwise conv before it, so inference needs no BatchNorm at all.
"""

import re

import mlx.core as mx

from ..errors import FastVLMError

BN_EPS = 1e-5

_POINTWISE = re.compile(
    r"vision_tower\..*(stem\.layers\.2|downsample\.pointwise|mlp\.fc[12]|se\.(reduce|expand))\.weight$"
)
_LAYER_SCALE = re.compile(r"vision_tower\..*\.layer_scale(_1|_2)?$")


def to_mlx_layout(weights: dict[str, mx.array], torch_layout: bool) -> dict[str, mx.array]:
    """Conv weights to OHWI (when the source is PyTorch), 1x1 convs to (out, in), layer scales to (C,)."""
    out = {}
    for key, w in weights.items():
        if key.startswith("vision_tower.") and w.ndim == 4:
            if torch_layout:
                w = w.transpose(0, 2, 3, 1)
            if _POINTWISE.match(key):
                w = w.reshape(w.shape[0], -1)
        elif _LAYER_SCALE.match(key):
            w = w.reshape(-1)
        out[key] = w
    return out


def fold_batchnorm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace each ``X.bn.*`` group by a scaled ``X.conv.weight`` and a new ``X.conv.bias``.

    BN(conv(x)) = conv(x) * g / sqrt(var + eps) + (b - mean * g / sqrt(var + eps)); the
    conv has no bias of its own in FastViTHD's ConvFFN.
    """
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".bn.running_var")]:
        base = key[: -len(".bn.running_var")]
        gamma, beta = out.pop(f"{base}.bn.weight"), out.pop(f"{base}.bn.bias")
        mean, var = out.pop(f"{base}.bn.running_mean"), out.pop(key)
        conv_key = f"{base}.conv.weight"
        if f"{base}.conv.bias" in out:
            raise FastVLMError(f"{base}: conv before BatchNorm already has a bias")
        dtype = out[conv_key].dtype
        scale = gamma.astype(mx.float32) / mx.sqrt(var.astype(mx.float32) + BN_EPS)
        conv = out[conv_key].astype(mx.float32)
        out[conv_key] = (conv * scale.reshape(-1, *([1] * (conv.ndim - 1)))).astype(dtype)
        out[f"{base}.conv.bias"] = (beta.astype(mx.float32) - mean.astype(mx.float32) * scale).astype(dtype)
    leftover = [k for k in out if ".bn." in k]
    if leftover:
        raise FastVLMError(f"incomplete BatchNorm tensors: {', '.join(leftover[:3])}")
    return out
