"""The matmuls of one decode step: every decoder weight times a few rows, as MLX's BLAS, our kernel and PyTorch do them.

    python -m benchmarks.decode_matmul [--model-size 0.5B] [--rows 1,4,8] [--reps 5]

One decode step multiplies each decoder weight (24 layers of q, k, v, o, gate, up and down, then the output
projection: 1.98 GB in float32 for 0.5B) by one row per sequence. The weights are random and distinct, so each
step reads them all from memory, as decoding does. Figures are the best of --reps steps: ms per step, and GB/s of
weights read. "mlx" is ``x @ w.T`` (sgemm of the BLAS that fastvlm_mlx loads), "ours" is
``fastvlm_mlx.cpu.skinny.matmul``, "torch" is ``x @ w.T`` in PyTorch (when installed) with its own BLAS (MKL on
x86), on weights of the same shapes in a process of its own: in ours, the BLAS that fastvlm_mlx loads for MLX
would also take PyTorch's matmul calls (it once did, so the oldest "torch" figures in RESULTS.md are OpenBLAS's).
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time

from .shapes import text_config


def decoder_shapes(size: str):
    """(out, in) of every weight a decode step reads, in the order it reads them."""
    c = text_config(size)
    d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    return layer * layers + [(c["vocab_size"], d)]


def best_step(matmuls, reps: int) -> float:
    matmuls()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        matmuls()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_steps(size: str, rows: list, reps: int) -> dict:
    """{rows: seconds} of PyTorch's step, measured in a child process that never loads fastvlm_mlx's BLAS
    ({} without PyTorch)."""
    if importlib.util.find_spec("torch") is None:
        return {}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.decode_matmul",
        "--torch-worker",
        "--model-size",
        size,
        "--rows",
        ",".join(map(str, rows)),
        "--reps",
        str(reps),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(f"torch: {(done.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
        return {}
    return {int(r): t for r, t in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def torch_worker(size: str, rows: list, reps: int) -> None:
    import torch

    torch.manual_seed(0)
    weights = [torch.randn(shape) for shape in decoder_shapes(size)]
    times = {}
    for r in rows:
        x = {w.shape[1]: torch.randn(r, w.shape[1]) for w in weights}
        with torch.inference_mode():
            times[r] = best_step(lambda x=x: [x[w.shape[1]] @ w.T for w in weights], reps)
    print(json.dumps(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="0.5B")
    parser.add_argument("--rows", default="1,4,8", help="rows per matmul (sequences decoding together)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.torch_worker:
        return torch_worker(args.model_size, rows_list, args.reps)

    import fastvlm_mlx  # noqa: F401 - before mlx.core, so that MLX binds to the optimized BLAS

    # isort: split
    import mlx.core as mx

    from fastvlm_mlx.cpu import skinny

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    weights = [mx.random.normal(shape) for shape in decoder_shapes(args.model_size)]
    mx.eval(weights)
    nbytes = sum(w.nbytes for w in weights)
    assert skinny.kernel() is not None, "the kernel could not be built"
    print(
        json.dumps(
            {
                "benchmark": "decode-matmul",
                "model_size": args.model_size,
                "weights_gb": round(nbytes / 1e9, 3),
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "reps": args.reps,
            }
        )
    )
    torch_seconds = {}
    for rows in rows_list:
        x = {w.shape[1]: mx.random.normal((rows, w.shape[1])) for w in weights}
        mx.eval(list(x.values()))
        cases = {
            "mlx": lambda x=x: mx.eval([x[w.shape[1]] @ w.T for w in weights]),
            "ours": lambda x=x: [skinny.matmul(x[w.shape[1]], w) for w in weights],
        }
        result = {"rows": rows}
        seconds = {name: best_step(matmuls, args.reps) for name, matmuls in cases.items()}
        if rows == rows_list[0]:  # after MLX's timings, so the child process does not share the cores with them
            torch_seconds = torch_steps(args.model_size, rows_list, args.reps)
        if rows in torch_seconds:
            seconds["torch"] = torch_seconds[rows]
        for name, t in seconds.items():
            result[name] = {"ms": round(t * 1e3, 1), "gb_per_s": round(nbytes / t / 1e9, 1)}
        for name in ("mlx", "torch"):
            if name in result:
                result[f"ours_vs_{name}"] = round(result[name]["ms"] / result["ours"]["ms"], 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
