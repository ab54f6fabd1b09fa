"""Where fastvlm-mlx relies on mlx-lm beyond its documented API, in one place: fields of its KV caches, the
stream its generation loop runs on and its wired-memory context, and the change of class that turns its Qwen2
modules into the CPU variants.

These hold for the mlx-lm versions from ``MIN_MLX_LM`` on (pyproject's floor, which CI's floor lane installs);
``require_mlx_lm`` refuses older ones with one line when this module is imported (``fastvlm_mlx/__init__`` imports
it first), before anything meets a name they lack.
tests/test_lm_internals.py checks every assumption here against the installed mlx-lm.
"""

import re
from importlib import metadata

from .errors import FastVLMError

MIN_MLX_LM = "0.32.0"  # BatchKVCache.state with its write index (filled_length); LRUPromptCache in models.cache


def _release(version: str) -> tuple:
    """The leading numbers of a version string: "0.32.2rc1" -> (0, 32, 2)."""
    return tuple(int(n) for n in re.findall(r"\d+", re.match(r"[\d.]*", version).group())[:3])


def require_mlx_lm(installed: str | None = None) -> None:
    """Raise one clear FastVLMError where the installed mlx-lm is older than the floor (or missing)."""
    try:
        installed = installed or metadata.version("mlx-lm")
    except metadata.PackageNotFoundError:
        raise FastVLMError(f"mlx-lm is not installed; fastvlm-mlx needs mlx-lm>={MIN_MLX_LM}") from None
    if _release(installed) < _release(MIN_MLX_LM):
        raise FastVLMError(
            f"mlx-lm {installed} is older than {MIN_MLX_LM}, the oldest fastvlm-mlx works with: "
            f"pip install -U 'mlx-lm>={MIN_MLX_LM}'"
        )


require_mlx_lm()
# generation_stream: the (thread-local) stream mlx-lm's generation loop evaluates on, which our own prefills, vision
# encodes and inter-rank waits must use or wait for; wired_limit(model, streams): mlx-lm's context that wires the
# model's memory on a GPU while it runs.  Module-level names of mlx_lm.generate, not documented API.
from mlx_lm.generate import generation_stream, wired_limit  # noqa: E402, F401
from mlx_lm.models.cache import BatchKVCache, KVCache  # noqa: E402


def is_plain_kv_cache(cache) -> bool:
    """Whether ``cache`` is mlx-lm's unquantized, unrotated KVCache or BatchKVCache holding at least one position:
    keys and values in (batch, heads, buffer length, head dim) buffers filled from position 0."""
    return type(cache) in (KVCache, BatchKVCache) and cache.keys is not None


def is_quantized_cache(cache) -> bool:
    """Whether ``cache`` stores its keys and values quantized (mlx-lm's QuantizedKVCache and batch kin have bits)."""
    return hasattr(cache, "bits")


def filled_length(cache) -> int:
    """How many positions of a plain cache's buffers (``is_plain_kv_cache``) hold keys and values.  A KVCache's
    offset says it; a BatchKVCache's offset is per sequence (less its left padding), so its write index, the last
    field of its state, says it."""
    return cache.offset if type(cache) is KVCache else cache.state[4]


def become(module, variant: type) -> None:
    """Turn an mlx-lm module into ``variant``, a subclass that adds no parameters or state: the weights stay where
    they are and mlx-lm's code keeps working on the module."""
    if not issubclass(variant, type(module)):
        raise TypeError(f"{variant.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = variant
