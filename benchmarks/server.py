"""Server benchmark: our server and mlx-vlm's, on one full-size random-weight checkpoint, under load.

    python -m benchmarks.server --peers mlxvlm              # 0.5B, 1024 px, concurrency 1, 4, 8
    python -m benchmarks.server --smoke                     # tiny fixture checkpoint, seconds
    python -m benchmarks.server --memory 100                # our server's memory over 100 requests

The checkpoint is written once (default /tmp/fastvlm-bench-0.5B) in mlx-vlm's own format (format C:
mlx-vlm's FastVLM model with its random initialisation, saved by mlx-vlm's ``save_weights``), with the
test fixture's tokenizer, so both servers load the same file.  Each server runs in its own process on a
free 127.0.0.1 port; at each concurrency level ``--requests`` chat requests, each with its own 1024 px
image (a random picture, new at every level) and question, go out through the ``openai`` client, streamed, so TTFT is
the time to the first chunk that carries a token (logprobs are requested, since random weights
often decode to no text).  mlx-vlm sends nothing before text appears, so its TTFT is read from its
own log (``time_to_first_token``).  mlx-vlm's server process gets the same optimized BLAS through
LD_PRELOAD that ours loads itself.  Figures: requests/s, generated tokens/s (from the returned
usage), p50/p95 TTFT.  Every server is stopped at the end, also on failure.
"""

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "format_c"
WEIGHTS_MARK = "benchmark-weights.txt"


def make_checkpoint(path: Path, size: str, dtype: str = "float32") -> Path:
    """A full-size FastVLM in mlx-vlm's format with random weights (written once, reused); its vision tower
    has timm's initialisation (``shapes.timm_init``), which the file WEIGHTS_MARK records.  ``dtype`` is what
    the file stores: "bfloat16" as the published conversions do (mlx-community's FastVLM-0.5B-bf16, the
    transformers converter's output)."""
    if (path / "config.json").is_file():
        if not (path / WEIGHTS_MARK).is_file():
            raise SystemExit(
                f"error: {path} was written by an older benchmark, whose vision weights run through "
                "subnormal floats: delete it and run again"
            )
        stored = "bfloat16" if "stored as: bfloat16" in (path / WEIGHTS_MARK).read_text() else "float32"
        if stored != dtype:
            raise SystemExit(f"error: {path} stores {stored} weights, not {dtype}: pick another --checkpoint")
        return path
    import mlx.core as mx
    from mlx_vlm.models.fastvlm.config import ModelConfig, TextConfig, VisionConfig
    from mlx_vlm.models.fastvlm.fastvlm import Model
    from mlx_vlm.utils import save_config, save_weights

    from .shapes import text_config, timm_init

    config = json.loads((FIXTURE / "config.json").read_text())
    text = text_config(size)
    config.update({k: v for k, v in text.items()})
    config["mm_hidden_size"] = 3072
    config["mm_vision_tower"] = "mobileclip_l_1024"
    config["vision_config"] = dict(
        config["vision_config"],
        image_size=1024,
        hidden_size=3072,
        projection_dim=768,
        layers=[2, 12, 24, 4, 2],
        embed_dims=[96, 192, 384, 768, 1536],
    )
    mx.random.seed(0)
    vcfg = VisionConfig(image_size=1024)
    model = Model(
        ModelConfig(
            text_config=TextConfig(model_type="qwen2", **text),
            vision_config=vcfg,
            model_type="llava_qwen2",
            mm_hidden_size=3072,
        )
    )
    timm_init(model.vision_tower)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(tmp, model)
    save_config(config, tmp / "config.json")
    (tmp / WEIGHTS_MARK).write_text(f"vision tower: benchmarks.shapes.timm_init\nstored as: {dtype}\n")
    for f in FIXTURE.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, tmp / f.name)
    (tmp / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 1024, "width": 1024},
                "size": {"shortest_edge": 1024},
                "do_resize": True,
                "do_center_crop": True,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": False,
                "image_mean": [0, 0, 0],
                "image_std": [1, 1, 1],
                "resample": 3,
            }
        )
    )
    tmp.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(system: str, model: Path, max_batch: int, extra=()):
    port = free_port()
    if system == "ours":
        cmd = [
            sys.executable,
            "-m",
            "fastvlm_mlx.server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            *extra,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "mlx_vlm.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    log = open(f"/tmp/fastvlm-bench-{system}.log", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if system != "ours":  # the same optimized BLAS that fastvlm_mlx loads for itself (ld.so binds it first)
        from fastvlm_mlx import BLAS_LIBRARY

        if BLAS_LIBRARY and os.path.isabs(BLAS_LIBRARY):
            env["LD_PRELOAD"] = BLAS_LIBRARY
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system} server exited; see /tmp/fastvlm-bench-{system}.log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{system} server did not start in 600 s")


def images(n: int, resolution: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(png, format="JPEG")
        out.append("data:image/jpeg;base64," + base64.b64encode(png.getvalue()).decode())
    return out


def one_request(client, model_name, url, question, max_tokens):
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model=model_name,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
    )
    for chunk in stream:
        c = chunk.choices[0] if chunk.choices else None
        if ttft is None and c is not None and (c.delta.content or c.logprobs or c.finish_reason):
            ttft = time.perf_counter() - t0
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return ttft, tokens, time.perf_counter() - t0


def percentile(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else None


def logged_ttfts(log: Path, start: int):
    """mlx-vlm's own time_to_first_token log lines written since byte ``start`` (seconds)."""
    import re

    with open(log) as f:
        f.seek(start)
        return [float(x) for x in re.findall(r"time_to_first_token=([\d.]+)s", f.read())]


def run_level(port, model_name, urls, concurrency, max_tokens, log: Path = None):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    one_request(client, model_name, urls[-1], "Warm up.", 4)
    offset = log.stat().st_size if log else 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(
            pool.map(
                lambda i: one_request(
                    client, model_name, urls[i], f"Describe picture {i} ({concurrency}).", max_tokens
                ),
                range(len(urls) - 1),
            )
        )
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    if log:  # mlx-vlm streams no chunk until text appears (random weights: often only the last one); use its own figure
        ttfts = logged_ttfts(log, offset) or ttfts
    tokens = sum(r[1] for r in results)
    return dict(
        concurrency=concurrency,
        requests=len(results),
        wall_s=round(wall, 2),
        requests_per_s=round(len(results) / wall, 3),
        generated_tps=round(tokens / wall, 2),
        generated_tokens=tokens,
        ttft_p50_s=round(percentile(ttfts, 0.5), 3),
        ttft_p95_s=round(percentile(ttfts, 0.95), 3),
    )


def scrape(port: int) -> dict:
    """The server's memory gauges from /metrics (bytes)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    names = (
        "mlx_active_memory_bytes",
        "mlx_cache_memory_bytes",
        "mlx_peak_memory_bytes",
        "resident_memory_bytes",
        "image_cache_bytes",
        "prompt_cache_bytes",
    )
    values = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(f"fastvlm_{name} "):
                values[name] = int(float(line.split()[1]))
    return values


def memory_run(port: int, model_name: str, requests: int, resolution: int, max_tokens: int, warmup: int) -> dict:
    """``requests`` requests one after another, each with a new picture; memory after each.

    The image-feature and prompt caches grow by design up to their bounds (``--cache-mb``: small, so that they
    fill during warm-up).  Flat: after warm-up, no reading exceeds the highest one during warm-up by more
    than 2%."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    rows = []
    for i in range(requests):
        (url,) = images(1, resolution, seed=10_000 + i)
        one_request(client, model_name, url, f"Describe picture {i}.", max_tokens)
        rows.append(dict(request=i + 1, **scrape(port)))
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for name in ("resident_memory_bytes", "mlx_active_memory_bytes", "mlx_peak_memory_bytes", "mlx_cache_memory_bytes"):
        during = max(r[name] for r in rows[:warmup])
        after = [r[name] for r in rows[warmup:]]
        summary[name] = dict(
            max_in_warmup=during,
            min_after=min(after),
            max_after=max(after),
            growth_after_warmup=max(after) - min(after),
            flat=max(after) <= during * 1.02,
        )
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--checkpoint", type=Path, default=None, help="where the random-weight checkpoint is kept")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--peers", default="")
    p.add_argument("--smoke", action="store_true", help="the tiny fixture checkpoint (ours only)")
    p.add_argument(
        "--memory",
        type=int,
        default=0,
        metavar="N",
        help="instead: N requests with new images to our server, its memory after each",
    )
    p.add_argument("--warmup", type=int, default=25, help="with --memory: requests counted as warm-up")
    p.add_argument(
        "--cache-mb",
        default="8,64",
        help="with --memory: the server's image-feature and prompt cache "
        "bounds in MiB (small, so that they fill during warm-up)",
    )
    a = p.parse_args(argv)
    if a.smoke:
        model, resolution = ROOT / "tests" / "fixtures" / "format_a", 256
    else:
        model = make_checkpoint(a.checkpoint or Path(f"/tmp/fastvlm-bench-{a.model_size}"), a.model_size)
        resolution = 1024
    levels = [int(c) for c in a.concurrency.split(",")]
    # new pictures and questions at every level, so no level is served from an earlier level's caches
    urls = {c: images(a.requests + 1, resolution, seed=c) for c in levels}
    print(
        json.dumps(
            {
                "benchmark": "fastvlm-server",
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join(["python -m benchmarks.server"] + (argv if argv is not None else sys.argv[1:])),
                "cpu_count": os.cpu_count(),
                "checkpoint": str(model),
            }
        ),
        flush=True,
    )
    if a.memory:
        image_mb, prompt_mb = a.cache_mb.split(",")
        proc, port = start("ours", model, 1, ["--image-cache-mb", image_mb, "--prompt-cache-mb", prompt_mb])
        try:
            summary = memory_run(port, str(model), a.memory, resolution, a.max_tokens, min(a.warmup, a.memory - 1))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(json.dumps({"memory_summary": summary}), flush=True)
        return 0 if all(v["flat"] for v in summary.values()) else 1
    records = {}
    for system in ["ours"] + [s for s in a.peers.split(",") if s]:
        proc, port = start(system, model, max(levels))
        try:
            name = str(model)
            log = None if system == "ours" else Path(f"/tmp/fastvlm-bench-{system}.log")
            records[system] = [
                dict(system=system, **run_level(port, name, urls[c], c, a.max_tokens, log)) for c in levels
            ]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for rec in records[system]:
            print(json.dumps(rec), flush=True)
    head = "| system | concurrency | requests/s | generated tok/s | TTFT p50 s | TTFT p95 s |"
    lines = [head, "|---|---|---|---|---|---|"]
    for system, recs in records.items():
        for r in recs:
            lines.append(
                f"| {system} | {r['concurrency']} | {r['requests_per_s']} | {r['generated_tps']} | "
                f"{r['ttft_p50_s']} | {r['ttft_p95_s']} |"
            )
    for peer in [s for s in records if s != "ours"]:
        for o, q in zip(records["ours"], records[peer]):
            lines.append(
                f"ours/{peer} at concurrency {o['concurrency']}: generated tok/s "
                f"{o['generated_tps'] / max(q['generated_tps'], 1e-9):.2f}x, TTFT p95 "
                f"{o['ttft_p95_s'] / max(q['ttft_p95_s'], 1e-9):.2f}x"
            )
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
