"""Reading a checkpoint directory: config.json, safetensors (single or sharded), and which format it is.

Every problem is a FastVLMError that names the file and what is wrong, so that a
user with a half-downloaded or foreign checkpoint learns why before any weight is used.
"""

import json
from pathlib import Path

import mlx.core as mx

from ..errors import FastVLMError

APPLE = "apple"  # A: Apple's llava_qwen2 PyTorch checkpoints (apple/FastVLM-*)
HF = "hf"  # B: transformers fast_vlm
MLXVLM = "mlxvlm"  # C: mlx-vlm / mlx-community conversions
FASTVLM_MLX = "fastvlm_mlx"  # D: this project's own format

FORMAT_NAMES = {
    APPLE: "Apple llava_qwen2 (PyTorch)",
    HF: "transformers fast_vlm",
    MLXVLM: "mlx-vlm FastVLM",
    FASTVLM_MLX: "fastvlm-mlx",
}


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FastVLMError(f"{path}: no config.json (is this a FastVLM checkpoint directory?)")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FastVLMError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise FastVLMError(f"{file}: expected a JSON object")
    return config


def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint, checked against the shard index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise FastVLMError(f"{index}: not a valid shard index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FastVLMError(
                f"{path}: shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FastVLMError(f"{path}: no *.safetensors weight files")
    return files


def _read_safetensors(file: Path) -> dict[str, mx.array]:
    """One safetensors file; a truncated or corrupt file is reported by name."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len <= size - 8 else None
        if header is None:
            raise ValueError("bad header")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise FastVLMError(
                f"{file}: truncated ({size} bytes, its header needs {8 + header_len + end}); download it again"
            )
        return mx.load(str(file))
    except FastVLMError:
        raise
    except Exception as e:  # mlx raises plain RuntimeError/ValueError on corrupt files
        raise FastVLMError(
            f"{file}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def read_weights(path: Path) -> dict[str, mx.array]:
    weights = {}
    for file in weight_files(path):
        for key, value in _read_safetensors(file).items():
            if key in weights:
                raise FastVLMError(f"{file}: tensor {key} appears in more than one shard")
            weights[key] = value
    return weights


def detect_format(config: dict, keys, path: Path) -> str:
    """Decide the checkpoint format from config.json's model_type and the tensor names, which must agree."""
    model_type = config.get("model_type")
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if model_type == FASTVLM_MLX:
        fmt = FASTVLM_MLX
    elif model_type == "fast_vlm":
        fmt = HF
        if not has("model.vision_tower.timm_model."):
            raise FastVLMError(
                f"{path}: config says fast_vlm but no model.vision_tower.timm_model.* tensors were found"
            )
    elif model_type in ("llava_qwen2", "fastvlm"):
        if has("model.vision_tower.vision_tower.model."):
            fmt = APPLE
        elif has("vision_tower.vision_model."):
            fmt = MLXVLM
        elif has("language_model.") or has("multi_modal_projector."):
            raise FastVLMError(
                f"{path}: this checkpoint holds only the language model (Apple's app bundle keeps the vision "
                "encoder in fastvithd.mlpackage); convert the PyTorch checkpoint, e.g. apple/FastVLM-0.5B, instead"
            )
        else:
            raise FastVLMError(f"{path}: config says {model_type} but no FastViTHD vision tower tensors were found")
    elif model_type is None:
        raise FastVLMError(f"{path}/config.json: no model_type field")
    else:
        raise FastVLMError(
            f"{path}: unsupported model_type {model_type!r} (expected llava_qwen2, fast_vlm, fastvlm or {FASTVLM_MLX})"
        )
    return fmt
