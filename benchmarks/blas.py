"""fp32 matrix-product speed of MLX on CPU with and without the BLAS that fastvlm_mlx loads.

    python -m benchmarks.blas [--size 2048] [--reps 5]

Each case runs in a fresh interpreter, since the BLAS must be chosen before mlx.core is imported.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import fastvlm_mlx.cpu.blas as blas
lib = blas.load_fast_blas()
import mlx.core as mx
n, reps = int(sys.argv[1]), int(sys.argv[2])
mx.set_default_device(mx.cpu)
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
best = min((lambda t: (mx.eval(a @ b), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(reps))
print(json.dumps({"blas": lib or "bundled reference BLAS", "gflops": 2 * n**3 / best / 1e9}))
"""


def measure(env_value, size, reps):
    env = dict(os.environ)
    if env_value is None:
        env.pop("FASTVLM_MLX_BLAS", None)
    else:
        env["FASTVLM_MLX_BLAS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(size), str(reps)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    off = measure("0", args.size, args.reps)
    on = measure(None, args.size, args.reps)
    print(f"{args.size}x{args.size} fp32 matmul on CPU (best of {args.reps}):")
    print(f"  without: {off['gflops']:8.1f} GFLOP/s  ({off['blas']})")
    print(f"  with:    {on['gflops']:8.1f} GFLOP/s  ({on['blas']})  -> {on['gflops'] / off['gflops']:.0f}x")


if __name__ == "__main__":
    main()
