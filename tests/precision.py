"""The device and dtype the tests run in, the tolerances that dtype allows, and where the CPU layer exists.

A model loaded without ``dtype=`` computes in ``default_dtype`` of the checkpoint's stored dtype: FASTVLM_MLX_DTYPE
when set, else float32 on the CPU and the stored dtype on a GPU.  The fixtures store float32, so ``python -m pytest``
runs in float32 on this CPU and on a Mac's GPU alike; CI's second lane (FASTVLM_MLX_CPU=0 FASTVLM_MLX_DTYPE=float16)
runs the plain path in half precision, as a GPU does for a float16 checkpoint.  Every comparison is still against
the PyTorch references (tests/fixtures/reference.*), only with the tolerance of the dtype.
"""

import math
import os
import shlex
import shutil

import mlx.core as mx
import numpy as np
import pytest

import fastvlm_mlx
from fastvlm_mlx.loader import default_dtype

DEVICE = mx.default_device()
DTYPE = default_dtype(mx.float32)  # what a fixture (stored in float32) loaded without dtype= computes in
HALF = DTYPE != mx.float32

# Unit roundoff: the largest relative error of rounding one real number to the dtype (half its 2^-p spacing).
UNIT_ROUNDOFF = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}

# Weight layers (matmuls and convs, attention's two matmuls included) in series along the fixture model's deepest
# path, counted from its config (tests/fixtures/format_a/config.json):
#   vision tower: stem 3; stage 0: 2 RepMixer blocks x (token mixer + depthwise conv, fc1, fc2) = 8;
#   stages 1-2: 2 x (downsample 2 + 2 x 4) = 20; stages 3-4: 2 x (downsample 2, position conv 1,
#   2 attention blocks x (qkv, q k^T, weights v, proj, depthwise conv, fc1, fc2)) = 34; final conv + squeeze 3.
VISION_LAYERS = 3 + 8 + 20 + 34 + 3
PROJECTOR_LAYERS = 2
# decoder: 2 x (q|k|v, q k^T, weights v, o_proj, gate|up, down) + lm_head
DECODER_LAYERS = 2 * 6 + 1
# Each layer rounds three times in the computing dtype: its weight when cast at load, its product (MLX accumulates
# the dot products of half-precision matmuls in float32, then rounds once), and the elementwise step after it
# (bias, activation, norm or residual add).
ROUNDINGS_PER_LAYER = 3


def tolerance(float32_tol: float, layers: int) -> float:
    """The largest relative error (``rel_err``: max |ours - reference| over max |reference|) allowed for a value
    computed through ``layers`` weight layers in series, in the dtype the tests' models compute in.

    In float32 it is the test's own float32 tolerance.  In half precision each of n = 3 x layers roundings adds a
    relative error of at most u (the unit roundoff); independent rounding errors add like a random walk, so the
    output's relative error is of order u sqrt(n) (Higham and Mary, "A new approach to probabilistic rounding error
    analysis", SIAM J. Sci. Comput. 2019), not the worst case n u.  Float16's u = 2^-11 gives 7e-3 for the
    vision features (68 layers) and 3e-3 for text-only logits (13 layers); the float16 lane measures a sixth and
    two fifths of these against the references.  A real defect moves these values by 1e-2 to 1: the projector
    bias that ``test_formats`` drops as a control moves the logits by 0.19, 25 times float16's bound."""
    if not HALF:
        return float32_tol
    return max(float32_tol, UNIT_ROUNDOFF[DTYPE] * math.sqrt(ROUNDINGS_PER_LAYER * layers))


VISION_TOL = tolerance(1e-4, VISION_LAYERS)
EMBEDS_TOL = tolerance(1e-4, VISION_LAYERS + PROJECTOR_LAYERS)
LOGITS_TOL = tolerance(1e-4, VISION_LAYERS + PROJECTOR_LAYERS + DECODER_LAYERS)
TEXT_LOGITS_TOL = tolerance(1e-4, DECODER_LAYERS)

# Greedy tokens are compared with the reference's at every step only in float32.  In half precision a logit may
# move by LOGITS_TOL x max |logit| (about 0.1 on the fixture), more than some steps' top-2 margin (0.03 at the
# second step of the image prompt), so an equal token there would be luck, not proof: the tests compare the first
# step's logits with the reference's, tokens over the steps the margins decide (``assert_same_greedy_tokens``), and
# whole answers with the same path's own (the CLI against the API), which must be deterministic.
EXACT_TOKENS = not HALF


def _linux_cpu_build() -> bool:
    return fastvlm_mlx._linux_cpu_build()


def _cpu_layer_missing() -> str:
    """Why fastvlm_mlx.cpu's model variants cannot be tested here, or ''."""
    if not _linux_cpu_build():
        return "the CPU layer exists only in MLX's Linux CPU build (this is a GPU build or not Linux)"
    if DEVICE != mx.cpu:
        return f"the CPU layer runs only on the CPU; MLX's default device here is {DEVICE}"
    from fastvlm_mlx import cpu

    if not cpu.enabled():
        return "the CPU layer is switched off (FASTVLM_MLX_CPU=0), as on a GPU"
    if HALF:
        return f"the CPU layer computes in float32; models here compute in {DTYPE} (FASTVLM_MLX_DTYPE)"
    return ""


def _compiler_missing() -> str:
    """Why the C kernels (fastvlm_mlx/cpu/*.c) cannot be built here, or ''."""
    missing = _cpu_layer_missing()
    if missing:
        return missing
    words = shlex.split(os.environ.get("CC", ""))
    found = shutil.which(words[0]) if words else shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return "" if found else "no C compiler to build the CPU layer's kernels (cc, gcc or clang; or set CC)"


# The process-wide part of the CPU layer (BLAS preload, malloc tuning), which FASTVLM_MLX_CPU does not switch.
requires_linux_cpu_build = pytest.mark.skipif(
    not _linux_cpu_build(), reason="the BLAS preload and malloc tuning exist only in MLX's Linux CPU build"
)
# The CPU variants of the model's modules, installed at load on the CPU in float32 (fastvlm_mlx.cpu).
requires_cpu_layer = pytest.mark.skipif(bool(_cpu_layer_missing()), reason=_cpu_layer_missing() or "-")
# The CPU layer's compiled kernels (built with -march=native on first use).
requires_c_kernels = pytest.mark.skipif(bool(_compiler_missing()), reason=_compiler_missing() or "-")


def decided_steps(logprobs, noise: float) -> int:
    """How many leading greedy steps no change of the logits by up to ``noise`` could turn: those whose top-2
    margin exceeds 2 x noise.  Two correct runs that differ by rounding may part at the first step that is not."""
    for step, row in enumerate(logprobs):
        row = row.astype(mx.float32) if isinstance(row, mx.array) else row  # NumPy has no bfloat16
        top = np.sort(np.asarray(row, dtype=np.float32).reshape(-1))[-2:]
        if top[1] - top[0] <= 2 * noise:
            return step
    return len(logprobs)


def assert_same_greedy_tokens(got, expected, logprobs, noise: float) -> int:
    """``got`` equals ``expected`` (greedy tokens).  In float32 every step; in half precision the steps that
    ``logprobs`` (one run's per-step log-probabilities) decide beyond ``noise`` (the bound on how far the two
    runs' logits may differ): the first ones on the fixtures in float16, none in bfloat16, whose noise exceeds the
    first step's margin (the callers compare the logits themselves too).  Returns how many steps were compared."""
    got, expected = list(got), list(expected)
    if EXACT_TOKENS:
        assert got == expected
        return len(expected)
    n = decided_steps(logprobs, noise)
    assert got[:n] == expected[:n], (n, got, expected)
    return n
