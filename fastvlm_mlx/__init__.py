"""fastvlm-mlx: Apple's FastVLM on MLX.

    from fastvlm_mlx import load, generate
    model, processor = load("apple/FastVLM-0.5B")
    print(generate(model, processor, "Describe the image.", image="photo.jpg"))
"""

from .blas import load_fast_blas
from .heap import keep_large_buffers

BLAS_LIBRARY = load_fast_blas()  # must run before mlx.core is first imported
keep_large_buffers()  # Linux/glibc: large MLX buffers are reused instead of page-faulted in again

from .errors import FastVLMError  # noqa: E402
from .generation import GenerationResponse, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "FastVLMError", "BLAS_LIBRARY"]
