"""CoreML export of the FastViTHD vision encoder, built op by op with coremltools' MIL builder (no PyTorch).

The result is a drop-in for the ``fastvithd.mlpackage`` that Apple's FastVLM app loads:

    input   images          float32 [1, 3, S, S], NCHW, RGB in [0, 1]   (or an RGB image, scale 1/255)
    output  image_features  float32 [1, (S/64)^2, out_dim]            (tokens in row-major h, w order)

With ``include_projector`` the mlp2x_gelu projector runs inside the package too and the output is
``image_embeddings`` [1, (S/64)^2, hidden].

The program mirrors ``fastvlm_mlx/vision.py`` block by block: each ``_emit_*`` function below is the
counterpart of one module there, reading that module's (MLX) weights.  Inside the program everything is
NCHW, CoreML's conv layout: MLX conv weights (O, H, W, I) become (O, I, H, W), and the 1x1 convs that
MLX stores as Linear (out, in) become 1x1 convs (out, in, 1, 1), the form the Neural Engine runs best.
Const names are the MLX parameter paths with dots as underscores, so a tensor in the package can be
traced back to its source.

coremltools is optional (``pip install 'fastvlm-mlx[coreml]'``) and is imported only here.
"""

import functools
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fastvlm_mlx.errors import FastVLMError

PACKAGE_NAME = "fastvithd.mlpackage"
INPUT_NAME = "images"
OUTPUT_NAME = "image_features"
PROJECTED_OUTPUT_NAME = "image_embeddings"
PRECISIONS = ("float16", "float32")
LAYER_NORM_EPS = 1e-5


def require_coremltools():
    """Import coremltools or raise one clear FastVLMError; silences its import-time chatter on Linux."""
    quiet = logging.getLogger("coremltools")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Failed to load _MLModelProxy" etc.: expected off macOS
    try:
        import coremltools as ct
    except ImportError:
        raise FastVLMError(
            "CoreML export needs coremltools, which is not installed: pip install 'fastvlm-mlx[coreml]'"
        ) from None
    finally:
        quiet.setLevel(level)
    return ct


# ---------------------------------------------------------------------------------------------------
# MLX weights -> numpy


def _np(a) -> np.ndarray:
    import mlx.core as mx

    return np.array(a.astype(mx.float32), dtype=np.float32)


def _linear(m):
    """(weight (out, in), bias or None) of an nn.Linear, dequantized if it is a QuantizedLinear."""
    import mlx.core as mx

    if hasattr(m, "scales"):
        w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
    else:
        w = m.weight
    bias = m.get("bias")  # mlx modules are dicts of their parameters
    return _np(w), None if bias is None else _np(bias)


def _name(path: str) -> str:
    return path.replace(".", "_")


# ---------------------------------------------------------------------------------------------------
# Emitters: one per module of fastvlm_mlx/vision.py (and the projector of model.py).  x is NCHW fp32.


class _Emitter:
    def __init__(self, mb):
        self.mb = mb

    def const(self, path: str, value: np.ndarray):
        return self.mb.const(val=np.ascontiguousarray(value, dtype=np.float32), name=_name(path))

    def gelu(self, x, path: str):
        return self.mb.gelu(x=x, mode="EXACT", name=_name(path) + "_gelu")

    def channel_vector(self, path: str, v: np.ndarray):
        """A per-channel vector shaped (1, C, 1, 1) to broadcast against NCHW."""
        return self.const(path, v.reshape(1, -1, 1, 1))

    # -- convolutions ---------------------------------------------------------------------------------

    def conv(self, x, path: str, weight_ohwi: np.ndarray, bias: np.ndarray | None, stride: int = 1, groups: int = 1):
        """nn.Conv2d / grouped conv with 'same' padding (k // 2), MLX OHWI weights -> OIHW."""
        k = weight_ohwi.shape[1]
        p = k // 2
        return self.mb.conv(
            x=x,
            weight=self.const(path + ".weight", weight_ohwi.transpose(0, 3, 1, 2)),
            bias=None if bias is None else self.const(path + ".bias", bias),
            strides=[stride, stride],
            pad_type="custom",
            pad=[p, p, p, p],
            groups=groups,
            name=_name(path),
        )

    def pointwise(self, x, path: str, m):
        """nn.Linear over channels == 1x1 conv with weight (out, in, 1, 1)."""
        w, b = _linear(m)
        return self.mb.conv(
            x=x,
            weight=self.const(path + ".weight", w[:, :, None, None]),
            bias=None if b is None else self.const(path + ".bias", b),
            name=_name(path),
        )

    def depthwise(self, x, path: str, m):
        """vision.depthwise_conv: an nn.Conv2d with groups == in_channels, out_channels a multiple of it."""
        channels = x.shape[1]
        return self.conv(x, path, _np(m.weight), _np(m.bias), stride=m.stride[0], groups=channels)

    # -- blocks ---------------------------------------------------------------------------------------

    def stem(self, x, path: str, m):
        """vision.Stem: 3x3 s2 conv, 3x3 s2 depthwise, 1x1 conv, each followed by GELU."""
        conv, dw, pw = m.layers
        x = self.gelu(self.conv(x, f"{path}.layers.0", _np(conv.weight), _np(conv.bias), stride=2), f"{path}.layers.0")
        x = self.gelu(self.depthwise(x, f"{path}.layers.1", dw), f"{path}.layers.1")
        return self.gelu(self.pointwise(x, f"{path}.layers.2", pw), f"{path}.layers.2")

    def conv_ffn(self, x, path: str, m):
        """vision.ConvFFN: depthwise 7x7, 1x1 up, GELU, 1x1 down."""
        x = self.depthwise(x, f"{path}.conv", m.conv)
        x = self.gelu(self.pointwise(x, f"{path}.fc1", m.fc1), f"{path}.fc1")
        return self.pointwise(x, f"{path}.fc2", m.fc2)

    def scaled_residual(self, x, y, path: str, scale: np.ndarray):
        """x + scale * y with a per-channel scale."""
        y = self.mb.mul(x=y, y=self.channel_vector(path, _np(scale)), name=_name(path) + "_mul")
        return self.mb.add(x=x, y=y, name=_name(path) + "_add")

    def repmixer_block(self, x, path: str, m):
        """vision.RepMixerBlock: the fused mixer conv (identity included), then x + layer_scale * ConvFFN(x)."""
        x = self.depthwise(x, f"{path}.token_mixer", m.token_mixer)
        return self.scaled_residual(x, self.conv_ffn(x, f"{path}.mlp", m.mlp), f"{path}.layer_scale", m.layer_scale)

    def layer_norm(self, x, path: str, m):
        """nn.LayerNorm over channels (axis 1 in NCHW)."""
        return self.mb.layer_norm(
            x=x,
            axes=[1],
            gamma=self.const(path + ".weight", _np(m.weight)),
            beta=self.const(path + ".bias", _np(m.bias)),
            epsilon=LAYER_NORM_EPS,
            name=_name(path),
        )

    def attention(self, x, path: str, m):
        """vision.Attention: multi-head self-attention over the H*W positions in row-major order.

        In NCHW the tokens are the flattened last two axes, so q, k, v are (1, heads, head_dim, N) and
        the channel index c = head * head_dim + d, as in the MLX reshape.
        """
        mb, n = self.mb, _name(path)
        _, c, h, w = x.shape
        heads = m.num_heads
        hd = c // heads
        qkv = self.pointwise(x, f"{path}.qkv", m.qkv)  # (1, 3C, H, W): channels ordered (3, heads, hd)
        qkv = mb.reshape(x=qkv, shape=[1, 3 * c, h * w], name=n + "_qkv_tokens")
        q, k, v = mb.split(x=qkv, num_splits=3, axis=1, name=n + "_split")
        q = mb.reshape(x=q, shape=[1, heads, hd, h * w], name=n + "_q")
        k = mb.reshape(x=k, shape=[1, heads, hd, h * w], name=n + "_k")
        v = mb.reshape(x=v, shape=[1, heads, hd, h * w], name=n + "_v")
        q = mb.mul(x=q, y=np.float32(m.scale), name=n + "_q_scaled")
        scores = mb.matmul(x=q, y=k, transpose_x=True, transpose_y=False, name=n + "_scores")  # (1, heads, N, N)
        probs = mb.softmax(x=scores, axis=-1, name=n + "_softmax")
        out = mb.matmul(x=v, y=probs, transpose_x=False, transpose_y=True, name=n + "_context")  # (1, heads, hd, N)
        out = mb.reshape(x=out, shape=[1, c, h, w], name=n + "_merge")
        return self.pointwise(out, f"{path}.proj", m.proj)

    def attention_block(self, x, path: str, m):
        """vision.AttentionBlock: pre-norm attention and ConvFFN, each with a layer scale."""
        y = self.attention(self.layer_norm(x, f"{path}.norm", m.norm), f"{path}.token_mixer", m.token_mixer)
        x = self.scaled_residual(x, y, f"{path}.layer_scale_1", m.layer_scale_1)
        return self.scaled_residual(x, self.conv_ffn(x, f"{path}.mlp", m.mlp), f"{path}.layer_scale_2", m.layer_scale_2)

    def patch_embed(self, x, path: str, m):
        """vision.PatchEmbed: 7x7 s2 depthwise conv widening the channels, GELU, 1x1 conv, GELU."""
        x = self.gelu(self.depthwise(x, f"{path}.conv", m.conv), f"{path}.conv")
        return self.gelu(self.pointwise(x, f"{path}.pointwise", m.pointwise), f"{path}.pointwise")

    def rep_cpe(self, x, path: str, m):
        """RepCPE positional embedding: one 7x7 depthwise conv (its identity is folded in)."""
        return self.depthwise(x, path, m)

    def stage(self, x, path: str, m):
        if m.downsample is not None:
            x = self.patch_embed(x, f"{path}.downsample", m.downsample)
        if m.pos_emb is not None:
            x = self.rep_cpe(x, f"{path}.pos_emb", m.pos_emb)
        for i, block in enumerate(m.blocks):
            emit = self.attention_block if hasattr(block, "norm") else self.repmixer_block
            x = emit(x, f"{path}.blocks.{i}", block)
        return x

    def squeeze_excite(self, x, path: str, m):
        """vision.SqueezeExcite: gate = sigmoid(expand(relu(reduce(mean_hw(x)))))."""
        n = _name(path)
        s = self.mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True, name=n + "_mean")
        s = self.mb.relu(x=self.pointwise(s, f"{path}.reduce", m.reduce), name=n + "_relu")
        s = self.mb.sigmoid(x=self.pointwise(s, f"{path}.expand", m.expand), name=n + "_sigmoid")
        return self.mb.mul(x=x, y=s, name=n + "_gate")

    def final_conv(self, x, path: str, m):
        """vision.FinalConv: 3x3 depthwise doubling the width, squeeze-excite, GELU."""
        x = self.depthwise(x, f"{path}.conv", m.conv)
        return self.gelu(self.squeeze_excite(x, f"{path}.se", m.se), path)

    def fastvithd(self, x, path: str, m):
        x = self.stem(x, f"{path}.stem", m.stem)
        for i, stage in enumerate(m.stages):
            x = self.stage(x, f"{path}.stages.{i}", stage)
        return self.final_conv(x, f"{path}.final_conv", m.final_conv)

    def projector(self, x, path: str, m):
        """model.Projector (mlp2x_gelu) as 1x1 convs, still NCHW."""
        x = self.gelu(self.pointwise(x, f"{path}.linear_1", m.linear_1), f"{path}.linear_1")
        return self.pointwise(x, f"{path}.linear_2", m.linear_2)

    def tokens(self, x, name: str):
        """(1, C, h, w) -> (1, h*w, C): row-major tokens, the layout of Apple's image_features."""
        _, c, h, w = x.shape
        x = self.mb.reshape(x=x, shape=[1, c, h * w], name=name + "_flat")
        return self.mb.transpose(x=x, perm=[0, 2, 1], name=name)


# ---------------------------------------------------------------------------------------------------


def _split_model(model):
    """(vision tower, projector or None) from a FastVLM or a bare FastViTHD."""
    if hasattr(model, "vision_tower"):
        return model.vision_tower, model.projector
    if hasattr(model, "stem") and hasattr(model, "final_conv"):
        return model, None
    raise TypeError(f"expected a FastVLM or FastViTHD module, got {type(model).__name__}")


def check_resolution(resolution: int, patch_size: int = 64) -> None:
    if resolution < patch_size or resolution % patch_size:
        raise FastVLMError(f"CoreML resolution must be a positive multiple of {patch_size} (got {resolution})")


def build_program(model, resolution: int | None = None, include_projector: bool = False):
    """The MIL program (fp32, before coremltools' passes) for a FastVLM's or FastViTHD's vision encoder."""
    ct = require_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    tower, projector = _split_model(model)
    config = tower.config
    resolution = resolution or config.image_size
    check_resolution(resolution, config.patch_size)
    if include_projector and projector is None:
        raise FastVLMError("include_projector needs a whole FastVLM model (a bare vision tower has no projector)")
    emit = _Emitter(mb)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 3, resolution, resolution), dtype=types.fp32)],
        opset_version=ct.target.iOS17,
    )
    def prog(images):
        x = emit.fastvithd(images, "vision_tower", tower)
        if include_projector:
            x = emit.projector(x, "projector", projector)
            return emit.tokens(x, PROJECTED_OUTPUT_NAME)
        return emit.tokens(x, OUTPUT_NAME)

    return prog


@contextmanager
def _progress_bars_on_terminals_only():
    """coremltools draws a tqdm bar per pass pipeline even into logs; keep them for terminals, as our CLIs do."""
    try:
        from coremltools.converters.mil.mil.passes import pass_pipeline
    except ImportError:  # pragma: no cover - layout of another coremltools version
        yield
        return
    original = getattr(pass_pipeline, "tqdm", None)
    if original is None:  # pragma: no cover
        yield
        return
    pass_pipeline.tqdm = functools.partial(original, disable=None)
    try:
        yield
    finally:
        pass_pipeline.tqdm = original


def convert_program(prog, resolution: int, precision: str = "float16", image_input: bool = False):
    """ct.convert the program into an ML Program MLModel (iOS17 / macOS14 and later)."""
    ct = require_coremltools()
    if precision not in PRECISIONS:
        raise FastVLMError(f"CoreML precision must be one of {', '.join(PRECISIONS)} (got {precision})")
    shape = (1, 3, resolution, resolution)
    if image_input:
        inputs = [ct.ImageType(name=INPUT_NAME, shape=shape, scale=1 / 255.0, color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)]
    output_name = prog.functions["main"].outputs[0].name
    with _progress_bars_on_terminals_only():
        mlmodel = ct.convert(
            prog,
            convert_to="mlprogram",
            inputs=inputs,
            outputs=[ct.TensorType(name=output_name, dtype=np.float32)],  # fp32 out even at fp16 compute
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
            compute_units=ct.ComputeUnit.ALL,
        )
    mlmodel.short_description = "FastViTHD vision encoder of FastVLM (exported by fastvlm-mlx)"
    mlmodel.input_description[INPUT_NAME] = (
        "RGB image, resized and center-cropped" if image_input else "RGB pixels in [0, 1], NCHW"
    )
    mlmodel.output_description[output_name] = "one row per 64x64 patch, row-major"
    mlmodel.user_defined_metadata["com.fastvlm-mlx.precision"] = precision
    mlmodel.user_defined_metadata["com.fastvlm-mlx.resolution"] = str(resolution)
    return mlmodel


def export_mlmodel(
    model,
    resolution: int | None = None,
    precision: str = "float16",
    image_input: bool = False,
    include_projector: bool = False,
):
    """FastVLM / FastViTHD (MLX) -> coremltools MLModel, not yet saved."""
    tower, _ = _split_model(model)
    resolution = resolution or tower.config.image_size
    if precision not in PRECISIONS:
        raise FastVLMError(f"CoreML precision must be one of {', '.join(PRECISIONS)} (got {precision})")
    prog = build_program(model, resolution, include_projector)
    return convert_program(prog, resolution, precision, image_input)


def save_package(mlmodel, dst: Path, force: bool = False) -> Path:
    """Save ``mlmodel`` as the .mlpackage ``dst`` atomically: a temporary sibling renamed into place."""
    dst = Path(dst)
    if dst.suffix != ".mlpackage":
        raise FastVLMError(f"{dst}: a CoreML package path must end in .mlpackage")
    if dst.exists() and not force:
        raise FastVLMError(f"{dst}: already exists (use --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        mlmodel.save(str(tmp / dst.name))
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            dst.rename(old / dst.name)
            (tmp / dst.name).rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            (tmp / dst.name).rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def export_coreml(
    model,
    output: str | Path,
    resolution: int | None = None,
    precision: str = "float16",
    image_input: bool = False,
    include_projector: bool = False,
    force: bool = False,
) -> Path:
    """Export the vision encoder of ``model`` (FastVLM or FastViTHD in MLX) to the .mlpackage ``output``."""
    output = Path(output)
    if output.suffix != ".mlpackage":
        raise FastVLMError(f"{output}: a CoreML package path must end in .mlpackage")
    if output.exists() and not force:
        raise FastVLMError(f"{output}: already exists (use --force to replace it)")
    mlmodel = export_mlmodel(model, resolution, precision, image_input, include_projector)
    return save_package(mlmodel, output, force)


def load_program(package: str | Path):
    """The MIL program stored in a saved .mlpackage (after coremltools' optimisation passes), as pymil.

    Works without a Mac: the package is read with ``skip_model_load=True`` and its protobuf
    (``spec.mlProgram``) is turned back into a pymil Program with the weights from its weight file.
    """
    ct = require_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    spec = mlmodel.get_spec()
    return milproto_to_pymil(spec, spec.specificationVersion, mlmodel.weights_dir)
