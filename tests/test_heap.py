"""fastvlm_mlx.cpu.heap: large MLX buffers go back to the heap for reuse instead of being unmapped on free.

Checked by what the process keeps resident after freeing a 200 MB array (not by timing), in fresh
interpreters so that the malloc setting of one run does not leak into another.
"""

import json
import os
import platform
import subprocess
import sys

import pytest
from precision import requires_linux_cpu_build

pytestmark = [
    requires_linux_cpu_build,  # the package tunes malloc only there (fastvlm_mlx/__init__.py)
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc tuning is glibc-only"),
]

SCRIPT = r"""
import json
import fastvlm_mlx
import mlx.core as mx

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

a = mx.ones((50_000_000,))
mx.eval(a)
during = rss_mb()
del a
print(json.dumps({"tuned": fastvlm_mlx.cpu.heap.tuned, "released_mb": during - rss_mb()}))
"""


def run(env_value=None):
    env = dict(os.environ)
    env.pop("FASTVLM_MLX_MALLOC", None)
    if env_value is not None:
        env["FASTVLM_MLX_MALLOC"] = env_value
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_large_buffer_stays_for_reuse():
    result = run()
    assert result["tuned"] is True
    assert result["released_mb"] < 20  # kept in the heap for the next array of that size


def test_can_be_turned_off():
    result = run("0")
    assert result["tuned"] is False
    assert result["released_mb"] > 150  # glibc's default: the 200 MB mapping is returned at once
