"""``load(path_or_repo)``: any supported checkpoint -> (FastVLM, FastVLMProcessor).

This project's own format loads directly; Apple, transformers and mlx-vlm
checkpoints are renamed and re-laid-out in memory by ``fastvlm_mlx.checkpoints`` (no torch
needed).  This is also the one place where a backend's speed path is chosen (``specialize``).
"""

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import mlx.core as mx
import mlx.nn as nn

from .checkpoints import read_checkpoint
from .errors import FastVLMError
from .mlx_thread import runs_on_mlx_thread
from .model import FastVLM, ModelConfig

if TYPE_CHECKING:
    from .adapters import Adapters
    from .distributed import Cluster
    from .processor import FastVLMProcessor

DEFAULT_MODEL = "apple/FastVLM-0.5B"


DTYPE_ENV = "FASTVLM_MLX_DTYPE"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(name: str) -> mx.Dtype:
    """``float32``, ``float16`` or ``bfloat16`` (as ``--dtype`` and FASTVLM_MLX_DTYPE spell it)."""
    found = DTYPES.get(str(name).strip().lower().replace("mlx.core.", ""))
    if found is None:
        raise FastVLMError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return found


def stored_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The floating dtype the checkpoint stores its decoder in (its final norm is never quantized)."""
    norm = weights.get("language_model.model.norm.weight")
    if norm is not None and mx.issubdtype(norm.dtype, mx.floating):
        return norm.dtype
    floats = [w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)]
    return max(set(floats), key=floats.count) if floats else mx.float32


def default_dtype(stored: mx.Dtype = mx.float32) -> mx.Dtype:
    """The dtype a model computes in when the caller names none.

    FASTVLM_MLX_DTYPE when set.  On a GPU the checkpoint's own dtype, as mlx-lm does: a bfloat16
    checkpoint cast to float16 overflows in Qwen2's larger models.  On the CPU float32, since MLX's CPU
    half-precision and quantized matmuls are far slower (and the CPU layer computes in float32)."""
    import os

    if os.environ.get(DTYPE_ENV):
        return parse_dtype(os.environ[DTYPE_ENV])
    return stored if mx.default_device() == mx.gpu else mx.float32


def resolve_path(path_or_repo: str) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded (or taken from the cache).

    A missing path that cannot be a repo id (``./x``, ``/x``, ``a/b/c``, or ``models/x`` where ``models``
    is a local folder) is reported as a missing directory instead of being looked up on the hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FastVLMError(f"{path}: not a directory (pass a model directory or a Hugging Face repo id)")
        return path
    first = path_or_repo.split("/")[0]
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")) or Path(first).is_dir():
        raise FastVLMError(f"{path_or_repo}: no such model directory")  # a local path, not a hub id
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=patterns))
    except Exception as e:  # hub errors come in many classes (offline, 404, gated, network)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastVLMError(
            f"{path_or_repo}: no such model directory, and could not get it from the Hugging Face Hub "
            f"({type(e).__name__}: {reason}); give the path of a local model directory instead"
        ) from None


def build_model(config: ModelConfig, weights: dict[str, mx.array], where: str = "checkpoint") -> FastVLM:
    """Instantiate the model and load every tensor strictly: no missing, no unexpected, no misshaped."""
    model = FastVLM(config)
    if config.quantization:
        q = config.quantization

        def quantized_here(path: str, module: nn.Module):
            """Layers the checkpoint holds quantized, with their own settings where config.json gives them
            (mlx-lm and mlx-vlm write per-layer entries keyed by the layer path)."""
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
            own = q.get(path)
            return {k: own[k] for k in ("group_size", "bits", "mode") if k in own} if isinstance(own, dict) else True

        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=quantized_here,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        msg = " ".join(str(e).split())
        raise FastVLMError(f"{where}: weights do not match the model ({msg[:300]})") from None
    model.eval()
    return model


def uses_cpu_layer(dtype: mx.Dtype) -> bool:
    """Whether a model of this dtype gets the CPU variants of ``fastvlm_mlx.cpu``: float32 on the CPU,
    unless FASTVLM_MLX_CPU is off.  (MLX's CPU half-precision and quantized matmuls are too slow to
    be worth tuning; on a GPU MLX's own kernels are the fast path.)"""
    if mx.default_device() != mx.cpu or dtype != mx.float32:
        return False
    from . import cpu

    return cpu.enabled()


def specialize(model: FastVLM) -> FastVLM:
    """The one seam for backend speed paths, applied once per loaded model: on the CPU in float32 the
    modules become their CPU variants (same weights); anywhere else the model stays as it is.  A float32 model
    on a Linux CPU whose MLX computes with a reference BLAS gets one warning saying how to fix that."""
    from . import _linux_cpu_build

    dtype = model.language_model.model.norm.weight.dtype
    if mx.default_device() == mx.cpu and dtype == mx.float32 and _linux_cpu_build():
        from .cpu.blas import warn_if_slow_blas

        warn_if_slow_blas()
    if uses_cpu_layer(dtype):
        from .cpu import install

        install(model)
    return model


def load_model(
    path: Path,
    dtype: mx.Dtype | str | None = None,
    cluster: Optional["Cluster"] = None,
    adapters: Optional["Adapters"] = None,
) -> FastVLM:
    """Read, build and cast; put the ``adapters`` (``adapters.read_adapters``) on; with a ``cluster`` that splits
    the model, keep this rank's part of the decoder (the weights are still lazy then, so the rest is never
    materialised) and, on a follower, no vision tower."""
    config, weights = read_checkpoint(path)
    if cluster is not None and cluster.splits_model:
        cluster.check_split(config.text_args())
    stored = stored_dtype(weights)
    model = build_model(config, weights, str(path))
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype or default_dtype(stored)
    # On the CPU layer the decoder's weights stay in the checkpoint's bfloat16 (its kernels widen them as they read
    # them); a decoder split over ranks computes with mlx-lm's layers, which need them cast.
    compact = []
    if uses_cpu_layer(dtype) and (cluster is None or not cluster.splits_model):
        from .cpu.decoder import stored_compact

        compact = stored_compact(model.language_model)
    model.set_dtype(dtype)
    model.language_model.load_weights(compact, strict=False)  # back to the checkpoint's bfloat16
    if adapters is not None:
        with_adapters(model, adapters, dtype, cluster)
    if cluster is not None and cluster.splits_model:
        cluster.split(model.language_model)
    needed = model.parameters() if cluster is None or cluster.leader else model.language_model.parameters()
    mx.eval(needed)
    return specialize(model)


def with_adapters(model: FastVLM, adapters: "Adapters", dtype: mx.Dtype, cluster: Optional["Cluster"]) -> None:
    """Put the adapters on the model as built and cast.  Where the CPU layer will compute (float32), or mlx-lm
    splits each layer over ranks (tensor parallel), the LoRA and DoRA layers over plain weights are fused into
    them (the same sums, in float32 on the CPU); over quantized weights they stay LoRA layers, as mlx-lm keeps
    them, since fusing would round the update to the quantization's grid."""
    from .adapters import adapter_layers, apply_adapters, fuse_adapters

    apply_adapters(model, adapters)
    tensor_split = cluster is not None and cluster.mode == "tensor"
    if uses_cpu_layer(dtype) or tensor_split:
        fuse_adapters(model, keep_quantized=True)
    if tensor_split and adapter_layers(model):
        raise FastVLMError(
            f"{adapters.path}: --parallel tensor cannot split LoRA layers over a quantized model; "
            "fuse the adapters into it first (python -m fastvlm_mlx.fuse) or use --parallel pipeline"
        )


VISION_BACKENDS = ("mlx", "coreml")


@runs_on_mlx_thread
def load(
    path_or_repo: str = DEFAULT_MODEL,
    dtype: mx.Dtype | str | None = None,
    vision_backend: str = "mlx",
    cluster: Optional["Cluster"] = None,
    adapter_path: str | Path | None = None,
) -> tuple[FastVLM, "FastVLMProcessor"]:
    """Load a FastVLM checkpoint of any supported format; returns (model, processor).

    ``dtype`` (``mx.bfloat16`` or ``"bfloat16"``, ...) is what the model computes in; by default the
    checkpoint's own dtype on a GPU and float32 on the CPU (``default_dtype``).

    ``vision_backend="coreml"`` (macOS) encodes images with ``fastvithd.mlpackage`` from the model
    directory, as Apple's app does; the projector and decoder still run in MLX.  ``cluster``
    (``distributed.start``) splits the decoder over the ranks of a distributed group.

    ``adapter_path``: a folder of fine-tuned adapters (mlx-lm's ``adapter_config.json`` and
    ``adapters.safetensors``, as ``python -m fastvlm_mlx.lora`` writes them), put on the model as it loads.
    """
    from .processor import FastVLMProcessor

    if vision_backend not in VISION_BACKENDS:
        raise FastVLMError(f"vision_backend must be one of {', '.join(VISION_BACKENDS)} (got {vision_backend!r})")
    adapters = None
    if adapter_path is not None:  # before the model is read, so a bad adapter folder fails fast
        from .adapters import read_adapters

        adapters = read_adapters(adapter_path)
        if adapters.train_vision and vision_backend == "coreml":
            raise FastVLMError(
                f"{adapters.path}: the adapters tune the vision tower, which the CoreML tower cannot take "
                "(use --vision-backend mlx, or export the fused model's tower again)"
            )
    path = resolve_path(str(path_or_repo))
    coreml_tower = None
    if vision_backend == "coreml":  # before the weights are read, so a missing package fails fast
        from .coreml_vision import PACKAGE_NAME, CoreMLVisionTower

        coreml_tower = CoreMLVisionTower.open(path / PACKAGE_NAME)
    model = load_model(path, dtype, cluster, adapters)
    if coreml_tower is not None:
        if coreml_tower.resolution != model.config.image_size:
            raise FastVLMError(
                f"{coreml_tower.source}: takes {coreml_tower.resolution}px images "
                f"but the model uses {model.config.image_size}px"
            )
        model.vision_tower = coreml_tower  # a plain object: the MLX tower's weights are dropped
    processor = FastVLMProcessor.from_pretrained(path, model.config)
    return model, processor
