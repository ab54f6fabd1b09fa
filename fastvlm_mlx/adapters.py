"""Fine-tuned adapters on a loaded FastVLM: mlx-lm's two files (``adapter_config.json``, ``adapters.safetensors``)
in one folder, their keys rooted at the FastVLM model (``language_model.model.layers.1.self_attn.q_proj.lora_a``,
``projector.linear_1.weight``), as ``tree_flatten(model.trainable_parameters())`` of the tuned model gives them.

LoRA and DoRA layers are mlx-lm's (``linear_to_lora_layers`` on the language model), so adapters made by
``fastvlm_mlx.lora`` and mlx-lm's own layers are the same thing; full fine-tuning stores the tuned weights
themselves.  Every tensor of the file must land on a parameter of the model with its shape, so adapters made for
another model (size) are refused instead of half-applied.  ``loader.load(adapter_path=...)`` applies them before
``specialize``; ``fuse_adapters`` folds them into the weights (the CPU layer's inference, ``fastvlm_mlx.fuse``).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import FastVLMError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # the parameters mlx-lm's LoRA and DoRA layers add
# the parts of the model a file may hold weights of besides the decoder, and the config field that allows it
EXTRA_PARTS = {"projector": "train_projector", "vision_tower": "train_vision"}
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


@dataclass
class Adapters:
    """An adapter folder, read and checked (the weights are those of the file, not yet on a model)."""

    path: Path
    fine_tune_type: str
    num_layers: int
    lora_parameters: dict
    train_projector: bool = False
    train_vision: bool = False
    weights: dict[str, mx.array] = field(default_factory=dict, repr=False)


def read_adapters(adapter_path: str | Path) -> Adapters:
    """The adapter folder's config and weights, each problem as one line naming the path."""
    path = Path(adapter_path).expanduser()
    if not path.exists():
        raise FastVLMError(f"{path}: no such adapter folder")
    if not path.is_dir():
        raise FastVLMError(
            f"{path}: not a folder (--adapter-path names the folder holding {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise FastVLMError(f"{path}: no {CONFIG_FILE} in the adapter folder")
    if not weights_file.is_file():
        raise FastVLMError(f"{path}: no {WEIGHTS_FILE} in the adapter folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FastVLMError(f"{config_file}: not a readable JSON file ({e})") from None
    adapters = _checked_config(config, config_file)
    try:
        adapters.weights = mx.load(str(weights_file))
    except Exception as e:  # noqa: BLE001 - MLX reports a bad file as RuntimeError or ValueError
        raise FastVLMError(f"{weights_file}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    if not isinstance(adapters.weights, dict) or not adapters.weights:
        raise FastVLMError(f"{weights_file}: holds no tensors")
    return adapters


def _checked_config(config, config_file: Path) -> Adapters:
    """mlx-lm's fields (and ours) of adapter_config.json, with the missing ones at mlx-lm's defaults."""
    if not isinstance(config, dict):
        raise FastVLMError(f"{config_file}: must hold a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise FastVLMError(f"{config_file}: fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)} (got {kind!r})")
    num_layers = config.get("num_layers", 16)
    if type(num_layers) is not int:
        raise FastVLMError(f"{config_file}: num_layers must be an integer (got {num_layers!r})")
    lora = config.get("lora_parameters", {})
    if kind != "full":
        if not isinstance(lora, dict) or not all(k in lora for k in ("rank", "scale")):
            raise FastVLMError(f"{config_file}: lora_parameters must give the LoRA rank and scale (got {lora!r})")
        if type(lora["rank"]) is not int or lora["rank"] < 1 or not isinstance(lora["scale"], (int, float)):
            raise FastVLMError(f"{config_file}: lora_parameters' rank must be a positive integer and scale a number")
        keys = lora.get("keys")
        if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
            raise FastVLMError(f"{config_file}: lora_parameters' keys must be a list of layer names (got {keys!r})")
        lora = {**lora, "dropout": lora.get("dropout", 0.0)}
    flags = {}
    for name in EXTRA_PARTS.values():
        value = config.get(name, False)
        if not isinstance(value, bool):
            raise FastVLMError(f"{config_file}: {name} must be true or false (got {value!r})")
        flags[name] = value
    return Adapters(config_file.parent, kind, num_layers, lora, **flags)


def apply_adapters(model, adapters: "Adapters | str | Path"):
    """Put the adapters on ``model`` (a FastVLM as built, before ``specialize``): mlx-lm's LoRA or DoRA layers on
    the decoder's last ``num_layers`` layers, then every tensor of the file in its place.  Returns the model."""
    if not isinstance(adapters, Adapters):
        adapters = read_adapters(adapters)
    if adapters.fine_tune_type != "full":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        try:
            linear_to_lora_layers(
                model.language_model,
                adapters.num_layers,
                adapters.lora_parameters,
                use_dora=adapters.fine_tune_type == "dora",
            )
        except (ValueError, KeyError, TypeError) as e:
            raise FastVLMError(f"{adapters.path}: cannot make the adapter layers on this model ({e})") from None
    model.load_weights(_placed(model, adapters), strict=False)
    return model  # still lazy: the loader evaluates what its rank keeps


def _placed(model, adapters: Adapters) -> list[tuple[str, mx.array]]:
    """The file's tensors as (name, value) for ``load_weights``, after checking that each has a place of its shape
    in the model, and that every LoRA or DoRA parameter the layers made comes from the file."""
    params = dict(tree_flatten(model.parameters()))
    compute = _compute_dtype(model)

    def allowed(name: str) -> bool:
        part = name.split(".", 1)[0]
        if part in EXTRA_PARTS:
            return getattr(adapters, EXTRA_PARTS[part])
        if part != "language_model":
            return False
        return adapters.fine_tune_type == "full" or name.rsplit(".", 1)[-1] in ADAPTER_LEAVES

    unplaced = [n for n in adapters.weights if n not in params or not allowed(n)]
    misshaped = [
        f"{n} is {tuple(w.shape)} in the file, {tuple(params[n].shape)} in the model"
        for n, w in adapters.weights.items()
        if n in params and allowed(n) and w.shape != params[n].shape
    ]
    missing = [n for n in params if n.rsplit(".", 1)[-1] in ADAPTER_LEAVES and n not in adapters.weights]
    for part, flag in EXTRA_PARTS.items():
        if getattr(adapters, flag) and not any(n.startswith(part + ".") for n in adapters.weights):
            missing.append(f"{part}.* ({flag} is set)")
    problems = []
    if unplaced:
        problems.append(f"{len(unplaced)} tensor(s) with no place in this model, e.g. {unplaced[0]}")
    if misshaped:
        problems.append(f"{len(misshaped)} of another shape, e.g. {misshaped[0]}")
    if missing:
        problems.append(f"{len(missing)} adapter parameter(s) missing from the file, e.g. {missing[0]}")
    if problems:
        raise FastVLMError(
            f"{adapters.path / WEIGHTS_FILE}: does not fit this model ({'; '.join(problems)}); "
            "were the adapters made for another model or with other settings?"
        )
    placed = []  # tuned weights take the dtype the model computes in; LoRA and DoRA keep their own, as in mlx-lm
    for name, value in adapters.weights.items():
        if name.rsplit(".", 1)[-1] not in ADAPTER_LEAVES and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(compute or value.dtype)
        placed.append((name, value))
    return placed


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of the LoRA and DoRA layers in ``model`` (mlx-lm's, which can ``fuse``)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "fuse") and _base(m) is not None]


def _base(layer: nn.Module) -> nn.Module | None:
    """The layer a LoRA or DoRA layer adapts (mlx-lm names it ``linear`` or ``embedding``)."""
    base = getattr(layer, "linear", None)
    return base if base is not None else getattr(layer, "embedding", None)


def fuse_adapters(model: nn.Module, dequantize: bool = False, keep_quantized: bool = False) -> int:
    """Fold each LoRA or DoRA layer into one plain layer with mlx-lm's ``fuse``; returns how many were fused.

    A weight stored in bfloat16 under a float32 model (the CPU layer's compact storage) is widened to the dtype the
    model computes in first, so the update is not rounded to 16 bits.  A quantized base is re-quantized after the
    update, which is not exact: with ``keep_quantized`` those layers stay unfused; ``dequantize`` makes them plain."""
    compute = _compute_dtype(model)
    fused = []
    for name, layer in adapter_layers(model):
        base = _base(layer)
        if keep_quantized and isinstance(base, QUANTIZED):
            continue
        if compute is not None and not isinstance(base, QUANTIZED) and base.weight.dtype.size < compute.size:
            base.weight = base.weight.astype(compute)
        fused.append((name, layer.fuse(dequantize=dequantize)))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def _compute_dtype(model: nn.Module) -> mx.Dtype | None:
    """The dtype the decoder computes in: its final norm's, which is never quantized or stored compact."""
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("model.norm.weight"):
            return value.dtype
    return None
