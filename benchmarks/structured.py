"""Structured-output benchmark: decode tokens/s under a nested JSON schema against free decoding, in one run.

    python -m benchmarks.structured                         # 0.5B, 1024 px, batch 1 and 8, 128 tokens, 3 reps
    python -m benchmarks.structured --peers mlxvlm          # also mlx-vlm's structured output (it needs Metal)
    python -m benchmarks.structured --smoke                 # tiny fixture checkpoint, seconds (CI)

One full-size random-weight checkpoint (``benchmarks.server.make_checkpoint``).  Its tokenizer is the test
fixture's (400 tokens), far smaller than Qwen2's 151,643, and llguidance's mask costs in proportion to the
vocabulary; so by default the checkpoint is copied beside itself with a byte-level BPE tokenizer of Qwen2's
size (``synthetic_tokenizer``: word-like merges drawn from a fixed seed, Qwen2's special tokens and ids);
``--vocab fixture`` keeps the small one.

Ours, in this process: batch 1 through ``Engine.stream`` (the path of ``stream_generate``, chat and one-off
server requests), batch 8 through ``BatchDecoder`` (the server and batch captioner), each free and under
the schema, temperature 1.0, a seed per sequence.  Random weights may end the constrained answer early
(its grammar completes) or a free one (an end-of-turn token), so each figure is a rate: tokens generated
after the first one over the time since the first one (prefill and the vision tower are not in it).
The figure compared is constrained / free (target: at least 0.90).

mlx-vlm (``--peers mlxvlm``, its own process): its ``stream_generate`` free and with its llguidance
logits processor (``mlx_vlm.structured``), whose mask is a Metal kernel (``mx.fast.metal_kernel``): where
MLX has no Metal back-end (Linux) its row is the error it raises.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .run import _machine, _versions
from .shapes import summarize

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Read the receipt in the image as JSON."
QWEN2_TOKENS = 151643  # Qwen2's regular tokens; its special tokens follow from this id
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# nested objects and arrays, strings bounded as a real extraction schema bounds them
SCHEMA = {
    "type": "object",
    "properties": {
        "shop": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "format": "date"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"enum": ["food", "drink", "household", "other"]}},
                },
                "required": ["name", "quantity", "price", "tags"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
        "total": {"type": "number"},
        "payment": {"enum": ["cash", "card", "other"]},
    },
    "required": ["shop", "date", "items", "total", "payment"],
    "additionalProperties": False,
}


def synthetic_tokenizer(checkpoint: Path, out: Path, size: int = QWEN2_TOKENS) -> Path:
    """A copy of ``checkpoint`` (weights linked, not copied) whose tokenizer is a byte-level BPE of ``size``
    regular tokens plus Qwen2's special tokens at Qwen2's ids: the 256 byte symbols, then merges that grow
    word-like pieces (letters after a letter or a leading space), drawn from a fixed seed."""
    if (out / "tokenizer.json").is_file():
        return out
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    base = [t for t, i in sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1]) if len(t) == 1][:256]
    letters = [c for c in base if c.isascii() and c.isalpha()]
    vocab = {t: i for i, t in enumerate(base)}
    merges, pieces = [], list(letters) + ["Ġ"]
    rng = random.Random(0)
    while len(vocab) < size:
        left, right = rng.choice(pieces), rng.choice(letters)
        piece = left + right
        if piece in vocab or len(piece) > 12:
            continue
        vocab[piece] = len(vocab)
        merges.append([left, right])
        pieces.append(piece)
    tokenizer["model"]["vocab"], tokenizer["model"]["merges"] = vocab, merges
    for i, added in enumerate(tokenizer["added_tokens"]):
        added["id"] = size + SPECIAL.index(added["content"]) if added["content"] in SPECIAL else size + 3 + i
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name not in ("tokenizer.json", "config.json"):
            (tmp / f.name).symlink_to(f.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(bos_token_id=size, eos_token_id=size + 2)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tmp.rename(out)
    return out


def request(engine, image):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
    return engine.prepare(messages)


def rate(tokens: int, first: float, last: float) -> float | None:
    """Tokens per second after the first token (None when only one came)."""
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else None


def decode_alone(engine, prompt, sampling) -> dict:
    """One sequence through ``Engine.stream``."""
    times = []
    for _ in engine.stream(prompt, sampling):
        times.append(time.perf_counter())
    return dict(tokens=len(times), tps=rate(len(times), times[0], times[-1]))


def decode_batched(engine, prompt, samplings) -> dict:
    """The sequences together through one ``BatchDecoder`` (prefilled together, then stepped to the end)."""
    decoder = engine.decoder(max_batch=len(samplings))
    decoder.admit([(prompt, s) for s in samplings])
    tokens, first = 0, None
    while decoder.running:
        tokens += len(decoder.step())
        if first is None:
            first, first_tokens = time.perf_counter(), tokens
    last = time.perf_counter()
    return dict(tokens=tokens, tps=(tokens - first_tokens) / (last - first) if last > first else None)


def bench_ours(model_path: Path, image, batches: list, max_tokens: int, reps: int) -> list:
    """Rows of (batch, mode, tokens, decode tokens/s) for ours, free and constrained, interleaved per rep."""
    import fastvlm_mlx  # the optimized BLAS before mlx.core

    # isort: split
    from fastvlm_mlx.engine import Sampling, engine_for
    from fastvlm_mlx.structured import constrain, vocabulary

    model, processor = fastvlm_mlx.load(str(model_path))
    engine = engine_for(model, processor)
    start = time.perf_counter()
    vocabulary(processor.tokenizer)  # built once per model, as every request after the first finds it
    vocabulary_s = time.perf_counter() - start
    grammar = constrain(schema=SCHEMA).grammar
    prompt = request(engine, image)

    def samplings(batch, constrained, rep):
        return [
            Sampling(
                max_tokens=max_tokens,
                temperature=1.0,
                seed=1000 * (rep + 1) + i,
                constraint=grammar if constrained else None,
            )
            for i in range(batch)
        ]

    decode_alone(engine, prompt, samplings(1, True, -1)[0])  # warm-up: both paths, the image in the cache
    decode_batched(engine, prompt, samplings(min(2, max(batches)), False, -1))
    rows = []
    for batch in batches:
        runs = {False: [], True: []}
        for rep in range(reps):
            for constrained in (False, True):
                s = samplings(batch, constrained, rep)
                r = decode_alone(engine, prompt, s[0]) if batch == 1 else decode_batched(engine, prompt, s)
                runs[constrained].append(r)
        for constrained, rs in runs.items():
            rows.append(
                dict(
                    system="ours",
                    batch=batch,
                    mode="constrained" if constrained else "free",
                    path="Engine.stream" if batch == 1 else "BatchDecoder",
                    tokens=[r["tokens"] for r in rs],
                    decode_tps=summarize([r["tps"] for r in rs]),
                )
            )
    return rows, dict(vocabulary=processor.tokenizer.vocab_size, vocabulary_build_s=round(vocabulary_s, 3))


def bench_mlxvlm(spec: dict) -> dict:
    """mlx-vlm's stream_generate, free and with its llguidance processor, at batch 1."""
    from fastvlm_mlx.cpu.blas import load_fast_blas

    load_fast_blas()  # the same BLAS as ours, before mlx.core
    import mlx.core as mx
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    mx.set_default_device(mx.cpu)
    model, processor = load(spec["model"])
    model.set_dtype(mx.float32)
    prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)

    tokenizer = getattr(processor, "tokenizer", processor)
    vocabulary = len(tokenizer)

    def in_vocabulary(tokens, logits):
        """Random weights can sample a row of the embedding table past the tokenizer's vocabulary, which
        mlx-vlm's detokenizer cannot look up: those rows are masked in both of its runs (ours skips them)."""
        return mx.where(mx.arange(logits.shape[-1]) < vocabulary, logits, -mx.inf)

    def run(processors, seed):
        mx.random.seed(seed)
        times = []
        for _ in stream_generate(
            model,
            processor,
            prompt,
            image=[spec["image"]],
            max_tokens=spec["max_tokens"],
            temperature=1.0,
            logits_processors=processors,
        ):
            times.append(time.perf_counter())
        return rate(len(times), times[0], times[-1])

    out = {}
    run([in_vocabulary], 999)
    out["free"] = summarize([run([in_vocabulary], rep) for rep in range(spec["reps"])])
    try:
        from mlx_vlm.structured import build_json_schema_logits_processor

        out["constrained"] = summarize(
            [
                run([in_vocabulary, build_json_schema_logits_processor(tokenizer, SCHEMA)], rep)
                for rep in range(spec["reps"])
            ]
        )
    except Exception as e:  # its mask is a Metal kernel: no Metal back-end, no figure
        out["constrained_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def _peer_process(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.structured", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=7200,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def ratio(rows: list, system: str, batch: int) -> float | None:
    found = {r["mode"]: r["decode_tps"] for r in rows if r["system"] == system and r["batch"] == batch}
    if not found.get("free") or not found.get("constrained"):
        return None
    return round(found["constrained"]["median"] / found["free"]["median"], 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--checkpoint", type=Path, default=None, help="a full-size random-weight checkpoint to reuse")
    p.add_argument("--vocab", default="qwen2", choices=["qwen2", "fixture"], help="the tokenizer's size (see above)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peers", default="", help="mlxvlm: also mlx-vlm's structured output")
    p.add_argument("--smoke", action="store_true", help="the tiny fixture checkpoint, ours only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(bench_mlxvlm(json.loads(a.worker))))
        return 0
    peers = [x for x in a.peers.split(",") if x]
    if any(x != "mlxvlm" for x in peers):
        p.error(f"unknown peer in {a.peers!r} (mlxvlm)")
    batches = [int(x) for x in a.batch_sizes.split(",")]
    if a.smoke:
        model, image = (
            ROOT / "tests" / "fixtures" / "format_a",
            str(ROOT / "tests" / "fixtures" / "images" / "photo.png"),
        )
        a.vocab, peers, batches, a.max_tokens, a.reps = "fixture", [], [1, 2], 16, 1
    else:
        from .batch import picture_folder
        from .server import make_checkpoint

        model = make_checkpoint(a.checkpoint or Path(f"/tmp/fastvlm-bench-{a.model_size}"), a.model_size)
        if a.vocab == "qwen2":
            model = synthetic_tokenizer(model, model.with_name(model.name + "-qwen2-vocab"))
        image = str(next(iter(sorted(picture_folder(Path("/tmp/fastvlm-bench-pictures-1024"), 1, 1024).glob("*.jpg")))))

    header = dict(
        benchmark="fastvlm-structured",
        command=" ".join(["python -m benchmarks.structured"] + (argv if argv is not None else sys.argv[1:])),
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine=_machine(),
        versions=_versions(),
        model=str(model),
        model_size="smoke" if a.smoke else a.model_size,
        max_tokens=a.max_tokens,
        reps=a.reps,
        temperature=1.0,
    )
    rows, info = bench_ours(model, image, batches, a.max_tokens, a.reps)
    header.update(info)
    print(json.dumps(header), flush=True)
    for row in rows:
        print(json.dumps(row), flush=True)
    for batch in batches:
        print(
            json.dumps(dict(system="ours", batch=batch, constrained_over_free=ratio(rows, "ours", batch))), flush=True
        )
    if "mlxvlm" in peers:
        peer = _peer_process(dict(model=str(model), image=image, max_tokens=a.max_tokens, reps=a.reps))
        for mode in ("free", "constrained"):
            if mode in peer:
                rows.append(dict(system="mlxvlm", batch=1, mode=mode, decode_tps=peer[mode]))
        print(json.dumps(dict(system="mlxvlm", batch=1, **peer, constrained_over_free=ratio(rows, "mlxvlm", 1))))

    print(f"\n{'system':<8} {'batch':>5} {'free tok/s':>11} {'schema tok/s':>13} {'schema/free':>12}", file=sys.stderr)
    for system, batch in dict.fromkeys((r["system"], r["batch"]) for r in rows):
        tps = {r["mode"]: r["decode_tps"]["median"] for r in rows if (r["system"], r["batch"]) == (system, batch)}
        share = ratio(rows, system, batch)
        print(
            f"{system:<8} {batch:>5} {tps.get('free', float('nan')):>11.1f} "
            f"{tps.get('constrained', float('nan')):>13.1f} "
            f"{'' if share is None else f'{share:.2f}':>12}",
            file=sys.stderr,
        )
    if "mlxvlm" in peers and "constrained_error" in peer:
        print(f"mlxvlm constrained: {peer['constrained_error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
