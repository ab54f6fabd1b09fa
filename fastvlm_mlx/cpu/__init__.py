"""The Linux-CPU speed layer: everything that makes MLX fast on a CPU and that Metal and CUDA never need.

MLX's Linux CPU build links a reference BLAS, runs grouped convs and its own erf/exp scalar, and has
no buffer cache.  This package works around each, in two places only:

1. At process start, before ``mlx.core`` is imported (``fastvlm_mlx/__init__.py`` calls
   ``prepare_process`` on Linux builds without a GPU backend): an optimized BLAS is preloaded
   (``blas``) and glibc malloc keeps large buffers for reuse (``heap``).  An optimized BLAS that the
   program bound itself before importing MLX is found and used as it is.
2. When a model is loaded on the CPU in float32 (``fastvlm_mlx.loader`` calls ``install``): the
   vision tower, the projector and the decoder's blocks, attention, MLPs and linear layers become CPU
   variants that hold the same weights and compute the same maths with the kernels of ``kernels``,
   ``depthwise`` and ``skinny`` (compiled C for the few-row matmuls of decoding), scheduled by
   ``vision`` and ``decoder``.  The variants add no parameters or state,
   so a module becomes its variant by a change of class and every weight stays where it was.  The decoder's
   linear and embedding weights of a bfloat16 checkpoint stay in bfloat16 (the loader asks
   ``decoder.stored_compact``), widened exactly by the kernels as they read them.  If MLX's matrix
   products still call a reference BLAS, one line says so and how to fix it.

This ``__init__`` imports nothing from MLX, so that step 1 can run before ``mlx.core`` is loaded.

Every environment switch of the package is listed in ``SWITCHES`` (a test checks that no other is read).
"""

SWITCHES = {
    "FASTVLM_MLX_DTYPE": "float32, float16 or bfloat16: what a model loaded without dtype= computes in (loader.py)",
    "FASTVLM_MLX_BLAS": "0/off/none/false/no: keep MLX's bundled BLAS; a path: load that library (blas.py)",
    "FASTVLM_MLX_MALLOC": "0/off/none/false/no: leave glibc malloc's thresholds alone (heap.py)",
    "FASTVLM_MLX_CPU": "0/off/none/false/no: run the plain model on the CPU too, without the CPU variants",
    "FASTVLM_MLX_CPU_STREAMS": "1: keep the vision tower in one CPU stream (vision.py)",
    "FASTVLM_MLX_SKINNY": (
        "0/off/none/false/no: decode with MLX's matmul, not the compiled few-row kernel, and widen "
        "a bfloat16 checkpoint's decoder weights at load (skinny.py)"
    ),
    "FASTVLM_MLX_DEPTHWISE": (
        "compiled (default), native, shift or toeplitz: the CPU depthwise-conv path (depthwise.py)"
    ),
}

CPU_ENV = "FASTVLM_MLX_CPU"


def enabled() -> bool:
    """Whether FASTVLM_MLX_CPU leaves the CPU variants on (it is read when a model is loaded)."""
    from .blas import switched_off

    return not switched_off(CPU_ENV)


def prepare_process():
    """Preload the BLAS and tune malloc; returns the BLAS library loaded (or None).  Never raises."""
    from .blas import load_fast_blas
    from .heap import keep_large_buffers

    library = load_fast_blas()  # must run before mlx.core is first imported
    keep_large_buffers()
    return library


def install(model) -> None:
    """Turn a loaded FastVLM's modules into their CPU variants (same weights, same outputs)."""
    from ..vision import FastViTHD
    from .decoder import install as install_decoder
    from .native import library
    from .vision import CpuFastViTHD, CpuProjector

    try:
        library()  # a first run compiles the C kernels here, at load, not in the first image's vision time
    except Exception:  # noqa: BLE001 - each kernel falls back to MLX's ops (skinny.kernel warns once)
        pass
    if type(model.vision_tower) is FastViTHD:  # a CoreML tower stays as it is
        model.vision_tower.__class__ = CpuFastViTHD
    model.projector.__class__ = CpuProjector
    install_decoder(model.language_model)
