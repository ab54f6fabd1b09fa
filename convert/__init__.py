"""Checkpoint conversion for fastvlm-mlx: readers, key maps, BatchNorm folding, quantization, writers.

Only the converters live here; the runtime in ``fastvlm_mlx`` imports this
package lazily, to read checkpoints that are not yet in its own format.
"""

from .reader import read_checkpoint
from .writer import convert_checkpoint

__all__ = ["read_checkpoint", "convert_checkpoint"]
