"""Decoder quantization with MLX's own affine quantization; the vision tower always stays in floating point."""

import mlx.nn as nn

from fastvlm_mlx.errors import FastVLMError


def quantize(model: nn.Module, bits: int, group_size: int, include_projector: bool = False) -> dict | None:
    """Quantize the language model's (and optionally the projector's) Linear/Embedding layers in place.

    Layers whose input width is not a multiple of ``group_size`` stay in floating point, as in mlx-lm.
    Returns the ``quantization`` entry for config.json (the format mlx-lm writes).
    """
    if bits not in (2, 3, 4, 5, 6, 8):
        raise FastVLMError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8 (got {bits})")
    if group_size not in (32, 64, 128):
        raise FastVLMError(f"--q-group-size must be 32, 64 or 128 (got {group_size})")
    prefixes = ("language_model.", "projector.") if include_projector else ("language_model.",)

    def wanted(path: str, module: nn.Module) -> bool:
        return (
            path.startswith(prefixes) and hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
        )

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=wanted)
    return {"group_size": group_size, "bits": bits, "mode": "affine"}
