"""Writing artefacts from any FastVLM checkpoint: MLX model directories (with quantization), the CoreML
vision encoder and the model folder of Apple's app.

Reading checkpoints is the runtime's job (``fastvlm_mlx.checkpoints``); this package builds on the
runtime and the runtime never imports it.
"""

from .writer import convert_checkpoint

__all__ = ["convert_checkpoint"]
