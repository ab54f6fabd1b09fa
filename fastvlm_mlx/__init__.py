"""fastvlm-mlx: Apple's FastVLM on MLX.

from fastvlm_mlx import load, generate
model, processor = load("apple/FastVLM-0.5B")
print(generate(model, processor, "Describe the image.", image="photo.jpg"))
"""

import sys


def _linux_cpu_build() -> bool:
    """Linux without MLX's CUDA backend: the build whose BLAS and malloc ``fastvlm_mlx.cpu`` fixes."""
    if not sys.platform.startswith("linux"):
        return False
    from importlib import metadata

    for name in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            metadata.version(name)
            return False
        except metadata.PackageNotFoundError:
            pass
    return True


BLAS_LIBRARY = None
if _linux_cpu_build():  # must run before mlx.core is first imported
    from .cpu import prepare_process

    BLAS_LIBRARY = prepare_process()

from . import lm_internals  # noqa: E402, F401  first: it refuses an mlx-lm older than the floor in one line
from .engine import GenerationResponse, generate, parse, stream_generate  # noqa: E402
from .errors import FastVLMError  # noqa: E402
from .loader import load  # noqa: E402
from .session import ChatSession  # noqa: E402
from .structured import StructuredOutputError, constrain  # noqa: E402

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "parse",
    "constrain",
    "ChatSession",
    "GenerationResponse",
    "FastVLMError",
    "StructuredOutputError",
    "BLAS_LIBRARY",
]
