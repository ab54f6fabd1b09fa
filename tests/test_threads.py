"""The public API from any thread: an app loads on its main thread and calls from worker threads.

Device and dtype: whatever the process defaults to (the CPU in float32 here, with and without the CPU layer; the
second CI lane runs this file with FASTVLM_MLX_CPU=0 in half precision), since the property is the same on each.
The CPU layer's runs need it (Linux's CPU, float32) and say so when they skip.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, ROOT
from precision import requires_cpu_layer

CPU_LAYER = [pytest.param("1", id="cpu-layer", marks=requires_cpu_layer), pytest.param("0", id="plain")]

SCRIPT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from fastvlm_mlx import ChatSession, generate, load, stream_generate

model, processor = load(sys.argv[1])
photo, photo2 = sys.argv[2], sys.argv[3]

def one_shot(i):
    image = photo if i % 2 else photo2
    return generate(model, processor, f"Describe picture {i}.", image=image, max_tokens=12,
                    temperature=0.8 if i % 3 else 0.0, seed=i)

def streamed(i):
    return "".join(r.text for r in stream_generate(model, processor, f"What is in it? ({i})", image=photo,
                                                     max_tokens=10, temperature=1.0, seed=100 + i))

def chat(i):
    session = ChatSession(model, processor)
    first = session.ask(f"Look at this ({i}).", images=[photo2], max_tokens=8)
    second = session.ask("And the colours?", max_tokens=8, temperature=0.7, seed=i)
    return [first, second, len(session.messages), len(session.cache.positions)]

calls = [(one_shot, 1), (streamed, 2), (chat, 3), (one_shot, 4), (streamed, 5), (chat, 6), (one_shot, 7),
         (chat, 8)]
alone = [fn(i) for fn, i in calls]  # on the main thread, one at a time
with ThreadPoolExecutor(4) as pool:
    together = list(pool.map(lambda call: call[0](call[1]), calls))
print(json.dumps({"alone": alone, "together": together}))
"""


@pytest.mark.parametrize("cpu_layer", CPU_LAYER)
def test_calls_from_a_thread_pool_match_calls_alone_and_exit_cleanly(cpu_layer):
    env = dict(os.environ, FASTVLM_MLX_CPU=cpu_layer, PYTHONFAULTHANDLER="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(FIXTURES / "format_a"), str(PHOTO), str(PHOTO2)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["together"] == out["alone"]
    assert all(out["alone"][i] for i in range(len(out["alone"])))


EXIT_SCRIPT = r"""
import sys, threading
from fastvlm_mlx import generate, load

model, processor = load(sys.argv[1])
result = []
worker = threading.Thread(target=lambda: result.append(
    generate(model, processor, "Describe.", image=sys.argv[2], max_tokens=4)))
worker.start()
worker.join()
assert result, "the worker thread produced nothing"
print("done")
"""


@pytest.mark.parametrize("cpu_layer", CPU_LAYER)
def test_generate_from_a_worker_thread_then_a_normal_exit(cpu_layer):
    """Before the MLX thread, this aborted at exit ('terminate called without an active exception', status 134)."""
    env = dict(os.environ, FASTVLM_MLX_CPU=cpu_layer, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(FIXTURES / "format_a"), str(PHOTO)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("done")
    assert "terminate called" not in proc.stderr
