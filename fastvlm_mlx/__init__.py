"""fastvlm-mlx: Apple's FastVLM on MLX.

    from fastvlm_mlx import load, generate
    model, processor = load("apple/FastVLM-0.5B")
    print(generate(model, processor, "Describe the image.", image="photo.jpg"))
"""

from .blas import load_fast_blas

BLAS_LIBRARY = load_fast_blas()  # must run before mlx.core is first imported

from .errors import FastVLMError  # noqa: E402
from .generation import GenerationResponse, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "FastVLMError", "BLAS_LIBRARY"]
