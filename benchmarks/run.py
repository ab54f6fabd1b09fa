"""FastVLM runtime benchmark: ours vs mlx-vlm vs transformers, random weights of the real shapes.

    python -m benchmarks.run                                  # ours, 0.5B, 1024 px, fp32, CPU
    python -m benchmarks.run --peers mlxvlm,hf --reps 3       # side by side, with ratios
    python -m benchmarks.run --smoke                          # tiny config, seconds (CI)

The prompt is 10 text tokens, one image, 30 text tokens (296 positions at 1024 px).  Token ids go
straight to the model (no tokenizer): ``model.embed_prompt`` + ``model.encode_image`` + mlx-lm's
``generate_step(input_embeddings=...)``, the path ``fastvlm_mlx.engine.Engine.stream`` takes.
mlx-lm's prefill evaluates only the KV cache for all but the last position, so the LM head runs for
one position (no full-prompt logits).

Figures, each min/median over --reps after one warm-up request:
  vision_ms    pixels -> projected image embeddings (tower + projector)
  ttft_ms      pixels -> first generated token (vision + prefill + first sample)
  prefill_tps  prompt positions / (ttft - vision)
  decode_tps   generated tokens / s over --decode-tokens (greedy)
  peak_gb      the framework's own peak (MLX: mx.get_peak_memory; torch CPU: none)
  rss_gb       peak resident memory of the process (the same yardstick for every system)
  load_ms      building the model and materializing its random weights (no file I/O)
Each system runs in its own subprocess.  Output: one JSON line per system and per ratio, then a table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from .shapes import PRE, prompt_ids, rss_peak_gb, summarize, text_config, timm_init, vision_shape

MARK = "BENCH_RESULT "
FIGURES = ["vision_ms", "ttft_ms", "prefill_tps", "decode_tps", "peak_gb", "rss_gb"]
HIGHER_IS_BETTER = {"prefill_tps", "decode_tps"}


# ----------------------------------------------------------------------------------------- ours
def _profile_vision(model, pixels, mx):
    """Per-stage times of the tower (each stage evaluated on its own), in ms."""
    times = {}
    x = pixels
    for name, part in model.vision_tower.parts():
        t0 = time.perf_counter()
        x = part(x)
        mx.eval(x)
        times[name] = (time.perf_counter() - t0) * 1e3
    b, h, w, c = x.shape
    t0 = time.perf_counter()
    mx.eval(model.projector(x.reshape(b, h * w, c)))
    times["projector"] = (time.perf_counter() - t0) * 1e3
    return times


def bench_ours(spec: dict) -> dict:
    import fastvlm_mlx  # loads the optimized BLAS before mlx.core

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from fastvlm_mlx.loader import specialize, uses_cpu_layer
    from fastvlm_mlx.model import IMAGE_PLACEHOLDER, FastVLM, ModelConfig
    from fastvlm_mlx.vision import VisionConfig

    if spec["device"] == "gpu":
        if not mx.is_available(mx.gpu):
            raise RuntimeError("no GPU backend in this MLX build")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, spec["dtype"])
    size, res = spec["size"], spec["resolution"]
    vshape = vision_shape(size)
    mx.random.seed(0)

    t0 = time.perf_counter()
    vcfg = VisionConfig(layers=list(vshape["layers"]), embed_dims=list(vshape["embed_dims"]), image_size=res)
    cfg = ModelConfig(vision_config=vcfg, text_config=text_config(size), mm_hidden_size=vcfg.out_dim)
    model = FastVLM(cfg)
    timm_init(model.vision_tower)
    model.set_dtype(dtype)
    if spec["q_bits"]:
        nn.quantize(model.language_model, group_size=64, bits=spec["q_bits"])
    mx.eval(model.parameters())
    specialize(model)  # the CPU variants on the CPU in float32, as load() does
    load_ms = (time.perf_counter() - t0) * 1e3

    pre, post = prompt_ids(cfg.text_config["vocab_size"])
    ids = pre + [IMAGE_PLACEHOLDER] + post
    n_img = cfg.num_image_tokens
    tokens = mx.array(pre + [0] * n_img + post)  # ids for mlx-lm's bookkeeping; embeddings carry the image
    pixels = mx.random.uniform(shape=(1, res, res, 3)).astype(dtype)
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731

    def one(decode_tokens, prompt_cache=None, skip=0):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        image = model.encode_image(pixels)
        mx.eval(image)
        t1 = time.perf_counter()
        embeds = model.embed_prompt(ids, image)
        steps = generate_step(
            tokens[skip:],
            model,
            max_tokens=decode_tokens,
            sampler=greedy,
            input_embeddings=embeds[skip:],
            prompt_cache=prompt_cache,
        )
        next(steps)
        t2 = time.perf_counter()
        n = 1
        for _ in steps:
            n += 1
        t3 = time.perf_counter()
        positions = int(embeds.shape[0])
        return dict(
            vision_ms=(t1 - t0) * 1e3,
            ttft_ms=(t2 - t0) * 1e3,
            prefill_tps=(positions - skip) / (t2 - t1),
            decode_tps=(n - 1) / (t3 - t2) if n > 1 else None,
            peak_gb=mx.get_peak_memory() / 1e9,
            positions=positions,
        )

    one(spec["warmup_decode"])
    runs = [one(spec["decode_tokens"]) for _ in range(spec["reps"])]
    cpu_layer = uses_cpu_layer(dtype)
    if cpu_layer:
        from fastvlm_mlx.cpu.depthwise import depthwise_impl
    info = dict(
        blas=fastvlm_mlx.BLAS_LIBRARY,
        cpu_layer=cpu_layer,
        depthwise=depthwise_impl() if cpu_layer else "native",
        load="build + materialize random weights (no file I/O)",
    )

    if spec["profile"]:
        profiles = [_profile_vision(model, pixels, mx) for _ in range(max(1, spec["reps"]))]
        info["vision_profile_ms"] = {k: summarize([p[k] for p in profiles]) for k in profiles[0]}
        for k, v in info["vision_profile_ms"].items():
            print(f"  profile {k:11s} min {v['min']:9.1f} ms  median {v['median']:9.1f} ms", file=sys.stderr)

    if spec["prefix_cache"]:
        # The PRE tokens before the image (a system prompt) prefilled once and reused: each request
        # then prefills only the image and the text after it.  Trimmed back after every request.
        cache = make_prompt_cache(model)
        model(mx.array(pre)[None], cache=cache)
        mx.eval([c.state for c in cache])
        cached = []
        for _ in range(spec["reps"]):
            cached.append(one(1, prompt_cache=cache, skip=PRE)["ttft_ms"])
            for c in cache:
                c.trim(c.offset - PRE)
        info["ttft_prefix_cached_ms"] = summarize(cached)
    return dict(runs=runs, load_ms=load_ms, info=info)


SYSTEMS = {"ours": bench_ours}


def _worker(system: str, spec: dict) -> None:
    if system == "ours":
        fn = bench_ours
    else:
        from .peers import PEERS

        fn = PEERS[system]
    result = fn(spec)
    result["rss_gb"] = rss_peak_gb()
    print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- driver
def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "timm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _machine() -> dict:
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": model,
        "cores": cores,
        "os": platform.platform(),
        "python": platform.python_version(),
        "blas": _blas_in_workers(),
    }


def _blas_in_workers() -> str:
    """The BLAS (and, for OpenBLAS, the kernels) a fresh worker process gets; asked of a child, since
    this process may have imported mlx.core already."""
    code = "import fastvlm_mlx.cpu.blas as b; b.load_fast_blas(); print(b.describe())"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return done.stdout.strip() or done.stderr.strip()[-200:]
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def run_system(system: str, spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", system, "--spec", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return {"system": system, "error": f"worker exited with {proc.returncode}", "wall_s": round(wall, 1)}
    raw = json.loads(lines[-1][len(MARK) :])
    runs = raw["runs"]
    rec = {
        "system": system,
        "model_size": spec["size"],
        "resolution": spec["resolution"],
        "dtype": spec["dtype"],
        "q_bits": spec["q_bits"],
        "device": spec["device"],
        "positions": runs[0]["positions"],
        "reps": spec["reps"],
        "decode_tokens": spec["decode_tokens"],
    }
    for fig in FIGURES:
        rec[fig] = summarize([r.get(fig) for r in runs]) if fig != "rss_gb" else summarize([raw["rss_gb"]])
    rec["load_ms"] = summarize([raw["load_ms"]])
    rec["info"] = raw["info"]
    rec["wall_s"] = round(wall, 1)
    return rec


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer on the medians: below 1 is better for times and memory, above 1 for tokens/s."""
    out = {"ratio": f"ours/{peer['system']}"}
    for fig in FIGURES + ["load_ms"]:
        a, b = ours.get(fig), peer.get(fig)
        out[fig] = round(a["median"] / b["median"], 3) if a and b and b["median"] else None
    return out


def table(records, ratio_rows) -> str:
    ok = [r for r in records if "error" not in r]
    head = ["figure"] + [f"{r['system']} min / median" for r in ok] + [r["ratio"] for r in ratio_rows]
    rows = []
    for fig in FIGURES + ["load_ms"]:
        row = [fig + (" (higher better)" if fig in HIGHER_IS_BETTER else "")]
        for r in ok:
            v = r.get(fig)
            row.append(
                "-"
                if not v
                else (
                    f"{v['min']:.2f} / {v['median']:.2f}"
                    if v["median"] < 100
                    else f"{v['min']:.0f} / {v['median']:.0f}"
                )
            )
        for rr in ratio_rows:
            row.append("-" if rr.get(fig) is None else f"{rr[fig]:.3f}")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]
    for r in records:
        if "error" in r:
            lines.append(f"{r['system']}: {r['error']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (multiple of 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--q-bits", type=int, default=None, choices=[2, 3, 4, 6, 8], help="quantize the decoder")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--peers", default="", help="comma list of mlxvlm,hf to run side by side")
    p.add_argument("--smoke", action="store_true", help="tiny config (seconds); for CI")
    p.add_argument("--profile", action="store_true", help="per-stage vision tower times (ours)")
    p.add_argument(
        "--prefix-cache",
        action="store_true",
        help="also time TTFT with the text before the image served from a prompt cache (ours)",
    )
    p.add_argument("--output", help="append the JSON lines to this file as well")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        _worker(a.worker, json.loads(a.spec))
        return 0
    if a.resolution % 64:
        print("error: --resolution must be a multiple of 64", file=sys.stderr)
        return 2
    peers = [s for s in a.peers.split(",") if s]
    unknown = set(peers) - {"mlxvlm", "hf"}
    if unknown:
        print(f"error: unknown peer(s) {sorted(unknown)}; choose from mlxvlm, hf", file=sys.stderr)
        return 2
    spec = dict(
        size="smoke" if a.smoke else a.model_size,
        resolution=128 if a.smoke else a.resolution,
        dtype=a.dtype,
        q_bits=a.q_bits,
        device=a.device,
        reps=2 if a.smoke else a.reps,
        decode_tokens=8 if a.smoke else a.decode_tokens,
        warmup_decode=4 if a.smoke else 8,
        profile=a.profile,
        prefix_cache=a.prefix_cache,
    )
    t0 = time.perf_counter()
    header = {
        "benchmark": "fastvlm",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:])),
        "machine": _machine(),
        "versions": _versions(),
        "spec": spec,
    }
    out = [header]
    print(json.dumps(header), flush=True)
    records = []
    for system in ["ours"] + peers:
        rec = run_system(system, spec)
        records.append(rec)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    ratio_rows = [ratios(records[0], r) for r in records[1:] if "error" not in r and "error" not in records[0]]
    for rr in ratio_rows:
        out.append(rr)
        print(json.dumps(rr), flush=True)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(records, ratio_rows), file=sys.stderr)
    if a.output:
        with open(a.output, "a") as f:
            for rec in out:
                f.write(json.dumps(rec) + "\n")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
