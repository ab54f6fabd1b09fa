"""Conversation benchmark: time to first token across the turns of a chat, ours vs mlx-vlm.

    python -m benchmarks.chat                      # 0.5B, 1024 px, random weights, CPU float32
    python -m benchmarks.chat --peers mlxvlm       # side by side, with ratios
    python -m benchmarks.chat --smoke              # tiny shapes, seconds

The conversation, run --reps times:
  cold       a new ChatSession: the image and a 20-token question (nothing cached)
  follow_up  a short text question in the same conversation (KV cache reused; ~30 new positions with
             the fixture's byte-level tokenizer, template included)
  seen_image a new conversation about the same image (image-feature cache hit)
Ours goes through the real ``ChatSession`` and engine, with the fixture's tokenizer on a random-weight
model of the real shape.  mlx-vlm's FastVLM has no prompt or vision-feature cache for this model, so
each of its turns encodes the image and prefills the whole conversation so far, as its chat does
when a conversation holds an image; it runs at the model level with the same position counts.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .shapes import rss_peak_gb, summarize, text_config, vision_shape

MARK = "CHAT_RESULT "
TURNS = ["cold", "follow_up", "seen_image"]
ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Please tell me what the large object in the middle of this picture is made of?"
FOLLOW_UP = "And its colour?"


def _model_config(spec):
    from fastvlm_mlx.model import ModelConfig
    from fastvlm_mlx.vision import VisionConfig

    v = vision_shape(spec["size"])
    vcfg = VisionConfig(layers=list(v["layers"]), embed_dims=list(v["embed_dims"]), image_size=spec["resolution"])
    return ModelConfig(vision_config=vcfg, text_config=text_config(spec["size"]), mm_hidden_size=vcfg.out_dim)


def bench_ours(spec: dict) -> dict:
    import fastvlm_mlx  # noqa: F401  (the CPU preload, before mlx.core)

    # isort: split
    import mlx.core as mx
    import numpy as np

    from fastvlm_mlx import ChatSession
    from fastvlm_mlx.engine import engine_for
    from fastvlm_mlx.loader import specialize
    from fastvlm_mlx.model import FastVLM
    from fastvlm_mlx.processor import FastVLMProcessor

    mx.random.seed(0)
    cfg = _model_config(spec)
    model = FastVLM(cfg)
    mx.eval(model.parameters())
    specialize(model)
    base = FastVLMProcessor.from_pretrained(ROOT / "tests" / "fixtures" / "format_a", cfg)
    processor = FastVLMProcessor(base.tokenizer, cfg.image_size, 32768)
    image = (np.random.default_rng(0).uniform(size=(spec["resolution"], spec["resolution"], 3)) * 255).astype(np.uint8)
    # the fixture tokenizer's random model may stop at once; keep every answer the same length
    from mlx_lm.sample_utils import make_logits_processors

    no_stop = make_logits_processors(logit_bias={t: -1e9 for t in processor.tokenizer.eos_token_ids})
    options = dict(max_tokens=spec["answer_tokens"], logits_processors=no_stop)

    def conversation():
        engine_for(model, processor).image_cache.clear()
        chat = ChatSession(model, processor)
        turns = {"cold": list(chat.stream(QUESTION, [image], **options))[-1]}
        turns["follow_up"] = list(chat.stream(FOLLOW_UP, **options))[-1]
        turns["seen_image"] = list(ChatSession(model, processor).stream(FOLLOW_UP, [image], **options))[-1]
        return {
            k: dict(ttft_ms=r.ttft_ms, vision_ms=r.vision_ms, positions=r.prompt_tokens, cached=r.cached_tokens)
            for k, r in turns.items()
        }

    conversation()  # warm-up
    runs = [conversation() for _ in range(spec["reps"])]
    return dict(runs=runs)


def bench_mlxvlm(spec: dict) -> dict:
    """Each turn: encode the image, prefill the whole conversation (positions as ours), first token."""
    from fastvlm_mlx.cpu.blas import load_fast_blas

    load_fast_blas()
    import mlx.core as mx
    from mlx_vlm.models.cache import KVCache
    from mlx_vlm.models.fastvlm.config import ModelConfig, TextConfig, VisionConfig
    from mlx_vlm.models.fastvlm.fastvlm import Model

    v = vision_shape(spec["size"])
    vcfg = VisionConfig(image_size=spec["resolution"])
    vcfg.layers, vcfg.embed_dims = list(v["layers"]), list(v["embed_dims"])
    cfg = ModelConfig(
        text_config=TextConfig(model_type="qwen2", **text_config(spec["size"])),
        vision_config=vcfg,
        model_type="llava_qwen2",
        mm_hidden_size=2 * v["embed_dims"][-1],
    )
    model = Model(cfg)
    model.eval()
    mx.eval(model.parameters())
    pixels = mx.random.uniform(shape=(1, 3, spec["resolution"], spec["resolution"]))
    n_img = (spec["resolution"] // 64) ** 2
    lm = model.language_model

    def turn(positions):
        text = positions - n_img
        ids = mx.array([[11] * 20 + [cfg.image_token_index] + [13] * (text - 20)])
        t0 = time.perf_counter()
        embeds = model.get_input_embeddings(ids, pixels).inputs_embeds
        mx.eval(embeds)
        t1 = time.perf_counter()
        cache = [KVCache() for _ in lm.model.layers]
        y = mx.argmax(lm(ids, cache=cache, inputs_embeds=embeds).logits[:, -1], axis=-1)
        y.item()
        return dict(ttft_ms=(time.perf_counter() - t0) * 1e3, vision_ms=(t1 - t0) * 1e3, positions=positions, cached=0)

    turn(spec["positions"]["cold"])  # warm-up
    runs = [{k: turn(spec["positions"][k]) for k in TURNS} for _ in range(spec["reps"])]
    return dict(runs=runs)


def _worker(system: str, spec: dict) -> None:
    result = {"ours": bench_ours, "mlxvlm": bench_mlxvlm}[system](spec)
    result["rss_gb"] = rss_peak_gb()
    print(MARK + json.dumps(result), flush=True)


def run_system(system: str, spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.chat", "--worker", system, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{system}: worker exited with {proc.returncode}")
    runs = json.loads(lines[-1][len(MARK) :])["runs"]
    rec = {"system": system}
    for t in TURNS:
        rec[t] = {k: summarize([r[t][k] for r in runs]) for k in ("ttft_ms", "vision_ms")}
        rec[t]["positions"], rec[t]["cached"] = runs[0][t]["positions"], runs[0][t]["cached"]
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--peers", default="")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, json.loads(a.spec))
        return 0
    spec = dict(
        size="smoke" if a.smoke else a.model_size,
        resolution=128 if a.smoke else a.resolution,
        reps=1 if a.smoke else a.reps,
        answer_tokens=a.answer_tokens,
    )
    print(
        json.dumps(
            {
                "benchmark": "fastvlm-chat",
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join(["python -m benchmarks.chat"] + (argv if argv is not None else sys.argv[1:])),
                "cpu_count": os.cpu_count(),
                "spec": spec,
            }
        ),
        flush=True,
    )
    records = [run_system("ours", spec)]
    spec["positions"] = {t: records[0][t]["positions"] for t in TURNS}
    records += [run_system(peer, spec) for peer in a.peers.split(",") if peer]
    for rec in records:
        print(json.dumps(rec), flush=True)
    ours = records[0]
    head = ["turn", "positions (cached, new)"] + [f"{r['system']} TTFT / vision ms" for r in records]
    head += [f"ours/{r['system']} TTFT" for r in records[1:]] + ["ours TTFT / cold"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in TURNS:
        p, c = ours[t]["positions"], ours[t]["cached"]
        cells = [t, f"{p} ({c}, {p - c})"]
        cells += [f"{r[t]['ttft_ms']['median']:.0f} / {r[t]['vision_ms']['median']:.0f}" for r in records]
        cells += [f"{ours[t]['ttft_ms']['median'] / r[t]['ttft_ms']['median']:.3f}" for r in records[1:]]
        cells.append(f"{ours[t]['ttft_ms']['median'] / ours['cold']['ttft_ms']['median']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
