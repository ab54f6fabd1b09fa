"""Several ranks of mx.distributed's ring backend on 127.0.0.1, started by the tests themselves (as
mlx.launch would, with MLX_RANK and MLX_HOSTFILE) and always stopped by them.

Proven against the single-process run of the same code, which tests/test_generate.py proves against
the PyTorch references: data-parallel batch output, tensor- and pipeline-parallel greedy tokens and
log-probabilities, a tensor-parallel server answering the openai client; and the failures: a split
that cannot be made, a rank that never starts, a rank that dies.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, ROOT, run_cli
from precision import DECODER_LAYERS, assert_same_greedy_tokens, tolerance

from fastvlm_mlx import generate, load
from fastvlm_mlx.distributed import local_hosts
from fastvlm_mlx.engine import stream_generate

MODEL = str(FIXTURES / "format_a")  # Qwen2 decoder with 4 heads, 2 KV heads, 2 layers
WORKER = ROOT / "tests" / "ranks" / "generate_worker.py"


class Ranks:
    """``n`` processes of one command, one per rank, killed on leaving the ``with`` block."""

    def __init__(self, tmp_path, command, n=2, stdin=None, ranks=None):
        self.hostfile = tmp_path / f"hosts-{time.monotonic_ns()}.json"
        self.hostfile.write_text(json.dumps(local_hosts(n)))
        # PYTHONFAULTHANDLER: a rank that crashes (a signal, an abort in native code) prints every thread's
        # Python stack to its stderr, which the assertions show
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",
            MLX_HOSTFILE=str(self.hostfile),
        )
        self.procs = [
            subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                env=dict(env, MLX_RANK=str(r)),
                text=True,
                stdin=subprocess.PIPE if stdin is not None and r == 0 else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for r in (range(n) if ranks is None else ranks)
        ]
        self.stdin = stdin

    def __enter__(self):
        return self

    def wait(self, timeout=180):
        """(returncode, stdout, stderr) of every rank."""
        out = []
        for i, p in enumerate(self.procs):
            stdout, stderr = p.communicate(self.stdin if i == 0 else None, timeout=timeout)
            out.append((p.returncode, stdout, stderr))
        return out

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


def single_process_steps(model, processor, max_tokens):
    steps = list(stream_generate(model, processor, "Describe the image.", PHOTO, max_tokens=max_tokens))
    return [r.token for r in steps], np.stack([np.array(r.logprobs.astype(mx.float32)) for r in steps])


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_model_parallel_generation_equals_one_process(mode, tmp_path, local):
    tokens, logprobs = single_process_steps(*local, max_tokens=12)
    out = tmp_path / "steps.json"
    with Ranks(tmp_path, [str(WORKER), MODEL, mode, str(PHOTO), "12", str(out)]) as ranks:
        results = ranks.wait()
    assert all(code == 0 for code, _, _ in results), results
    got = json.loads(out.read_text())
    assert got["ranks"] == 2
    # the ranks sum the decoder's matmuls in another order: in half precision that may turn a rounding in any
    # decoder layer, and tokens agree over the steps whose margins that cannot turn (every step in float32)
    noise = tolerance(1e-4, DECODER_LAYERS) * np.abs(logprobs).max()
    steps = assert_same_greedy_tokens(got["tokens"], tokens, logprobs, noise)
    got_logprobs = np.array(got["logprobs"])[: steps + 1]  # the step after the last compared one has the same context
    assert np.abs(got_logprobs - logprobs[: steps + 1]).max() <= noise


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_generate_cli_prints_on_rank_0_only(mode, tmp_path, local):
    expected = generate(*local, "What is it?", image=PHOTO2, max_tokens=10)
    cmd = [
        "-m",
        "fastvlm_mlx.generate",
        "-m",
        MODEL,
        "-i",
        str(PHOTO2),
        "-p",
        "What is it?",
        "--max-tokens",
        "10",
        "--parallel",
        mode,
    ]
    with Ranks(tmp_path, cmd) as ranks:
        (code0, out0, err0), (code1, out1, err1) = ranks.wait()
    assert code0 == 0 and code1 == 0, err0 + err1
    assert out0 == expected + "\n" and out1 == ""


def test_chat_follows_rank_0(tmp_path, local):
    model, processor = local
    from fastvlm_mlx.session import ChatSession

    chat = ChatSession(model, processor)
    expected = [chat.ask("What is this?", PHOTO, max_tokens=8), chat.ask("And the colour?", max_tokens=8)]
    cmd = ["-m", "fastvlm_mlx.chat", "-m", MODEL, "-i", str(PHOTO), "--max-tokens", "8"]
    with Ranks(tmp_path, cmd, stdin="What is this?\nAnd the colour?\n/save x.safetensors\n") as ranks:
        (code0, out0, err0), (code1, out1, _) = ranks.wait()
    assert code0 == 0 and code1 == 0, err0
    assert out0.splitlines() == expected and out1 == ""
    assert "not available with the decoder split" in err0  # /save refused with one line; the chat went on


def test_data_parallel_batch_equals_one_process_and_resumes(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"i{i:02d}", "image": str(PHOTO if i % 3 else PHOTO2)}) + "\n" for i in range(24))
        + json.dumps({"id": "bad", "image": str(tmp_path / "missing.png")})
        + "\n"
    )
    single = tmp_path / "single.jsonl"
    assert (
        run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(single), "--max-tokens", "10").returncode
        == 1
    )
    expected = {r["id"]: r for r in map(json.loads, single.read_text().splitlines())}

    out = tmp_path / "dp.jsonl"
    cmd = [
        "-m",
        "fastvlm_mlx.batch",
        "-m",
        MODEL,
        "-i",
        str(src),
        "-o",
        str(out),
        "--max-tokens",
        "10",
        "--batch-size",
        "2",
    ]
    with Ranks(tmp_path, cmd) as ranks:  # killed part-way: each rank has some records in its part file
        parts = [tmp_path / f"dp.jsonl.rank{r}-of-2" for r in range(2)]
        deadline = time.time() + 120
        while time.time() < deadline and not all(p.exists() and p.read_text().count("\n") >= 2 for p in parts):
            time.sleep(0.05)
        for p in ranks.procs:
            p.send_signal(signal.SIGKILL)
    assert not out.exists() and all(p.exists() for p in parts)
    with Ranks(tmp_path, cmd) as ranks:  # resumed: each rank does only what its part file lacks
        (code0, _, err0), (code1, _, err1) = ranks.wait()
    assert code0 == 1 and code1 == 1, err0 + err1  # one input has an error record
    assert "1 input(s) with errors" in err0 and "merged from 2 ranks" in err0
    lines = out.read_text().splitlines()
    got = [json.loads(line) for line in lines]
    assert [r["id"] for r in got] == [f"i{i:02d}" for i in range(24)] + ["bad"]  # every id once, in input order
    timing = ("ttft_ms",)  # measured, so it differs from run to run
    assert {r["id"]: {k: v for k, v in r.items() if k not in timing} for r in got} == {
        i: {k: v for k, v in r.items() if k not in timing} for i, r in expected.items()
    }
    assert not any(p.exists() for p in parts)
    # a finished run has nothing left to do on any rank
    with Ranks(tmp_path, cmd) as ranks:
        (code0, _, err0), _ = ranks.wait()
    assert code0 == 1 and "0 answered, 0 failed, 25 already" in err0 and out.read_text().splitlines() == lines


def test_tensor_parallel_batch_and_server(tmp_path, local):
    import httpx
    import openai

    model, processor = local
    src = tmp_path / "list.txt"
    src.write_text(f"{PHOTO}\n{PHOTO2}\n")
    out = tmp_path / "tp.jsonl"
    cmd = [
        "-m",
        "fastvlm_mlx.batch",
        "-m",
        MODEL,
        "-i",
        str(src),
        "-o",
        str(out),
        "--max-tokens",
        "8",
        "--parallel",
        "tensor",
    ]
    with Ranks(tmp_path, cmd) as ranks:
        (code0, _, err0), (code1, _, _) = ranks.wait()
    assert code0 == 0 and code1 == 0, err0
    texts = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert texts == {
        str(p): generate(model, processor, "Describe the image.", image=p, max_tokens=8) for p in (PHOTO, PHOTO2)
    }

    port = int(local_hosts(1)[0][0].split(":")[1])
    serve = ["-m", "fastvlm_mlx.server", "-m", MODEL, "--port", str(port), "--allowed-image-dir", str(FIXTURES)]
    with Ranks(tmp_path, serve) as ranks:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        from concurrent.futures import ThreadPoolExecutor

        def ask(i):
            r = client.chat.completions.create(
                model="m",
                max_tokens=8,
                temperature=0,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": f"file://{PHOTO if i % 2 else PHOTO2}"}},
                            {"type": "text", "text": f"Question {i}?"},
                        ],
                    }
                ],
            )
            return r.choices[0].message.content

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(4)))
        ranks.procs[0].send_signal(signal.SIGINT)
        (code0, _, err0), (code1, _, err1) = ranks.wait(timeout=60)
    assert code0 == 0 and code1 == 0, err0 + err1
    assert answers == [
        generate(model, processor, f"Question {i}?", image=PHOTO if i % 2 else PHOTO2, max_tokens=8) for i in range(4)
    ]


def test_impossible_split_is_refused_before_any_work(tmp_path):
    cmd = ["-m", "fastvlm_mlx.generate", "-m", MODEL, "-p", "hi", "--parallel", "tensor"]
    with Ranks(tmp_path, cmd, n=3) as ranks:
        results = ranks.wait()
    for code, out, err in results:
        assert code == 1 and out == "" and "Traceback" not in err
        assert err.strip() == (
            "error: --parallel tensor cannot split this model over 3 ranks: its 4 attention heads "
            "do not divide by 3 (use a divisor of 4 ranks, or --parallel pipeline)"
        )
    with Ranks(tmp_path, cmd[:-1] + ["pipeline"], n=3) as ranks:  # 2 layers cannot make 3 stages
        results = ranks.wait()
    assert all(code == 1 and "cannot split 2 decoder layers over 3 ranks" in err for code, _, err in results)


def test_a_rank_that_never_starts_times_out_clearly(tmp_path):
    cmd = ["-m", "fastvlm_mlx.generate", "-m", MODEL, "-p", "hi", "--connect-timeout", "3"]
    with Ranks(tmp_path, cmd, n=2, ranks=[0]) as ranks:  # rank 1 is never started
        t0 = time.time()
        ((code, out, err),) = ranks.wait(timeout=60)
    assert code != 0 and time.time() - t0 < 30
    assert "error: rank 0: the other ranks did not connect within 3 s" in err and "Traceback" not in err


def test_a_rank_that_dies_ends_the_other_with_a_clear_error(tmp_path):
    cmd = ["-m", "fastvlm_mlx.chat", "-m", MODEL, "--max-tokens", "4"]
    with Ranks(tmp_path, cmd, stdin="") as ranks:
        leader, follower = ranks.procs
        leader.stdin.write("Hello?\n")
        leader.stdin.flush()
        assert select.select([leader.stdout], [], [], 60)[0] and leader.stdout.readline()  # the first answer
        follower.send_signal(signal.SIGKILL)
        follower.wait(timeout=30)
        leader.stdin.write("Still there?\n")
        leader.stdin.flush()
        _, err = leader.communicate(timeout=60)
    assert leader.returncode == 1
    assert "error: lost another rank of the distributed group" in err and "Traceback" not in err
