"""Stop glibc from unmapping MLX's large CPU buffers on every free.

MLX's Linux CPU backend allocates each array with malloc and has no buffer cache.  glibc serves
requests above its mmap threshold (at most 32 MB by default) with a fresh mmap and unmaps them on
free, so every new 50-100 MB activation of the vision tower (the stem, stages 0-1, the attention
scores) is page-faulted in again, 4 KiB at a time, and an elementwise op over such a buffer spends most
of its time on the page faults.  Raising the mmap and trim thresholds makes those buffers come from, and go back to, the
heap, where the next op reuses them.  Freed memory stays with the process (up to the trim threshold),
as it does in MLX's own Metal buffer cache: MLX's peak is unchanged, the process's RSS grows a little,
and the vision encode is faster (benchmarks/RESULTS.md has the figures).

Environment variable FASTVLM_MLX_MALLOC: ``0``/``off``/``false``/``no`` leaves malloc alone.
"""

import ctypes
import platform
import sys

from .blas import switched_off

ENV_VAR = "FASTVLM_MLX_MALLOC"

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 30

tuned = False


def keep_large_buffers() -> bool:
    """On Linux with glibc, serve allocations up to 1 GiB from the heap and keep up to 1 GiB of it free.

    Returns whether malloc was tuned.  Never raises; does nothing elsewhere or when disabled.
    """
    global tuned
    if tuned:
        return True
    try:
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            return False
        if switched_off(ENV_VAR):
            return False
        libc = ctypes.CDLL(None)
        tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES)
        )
    except Exception:  # noqa: BLE001 - an import-time helper must never break the package import
        tuned = False
    return tuned
