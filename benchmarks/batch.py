"""Batch-captioning benchmark: images per second over a folder of pictures, ours beside the peers.

    python -m benchmarks.batch --peers mlxvlm,hf            # 0.5B, 1024 px, 64 new tokens, batch 1, 4, 8
    python -m benchmarks.batch --ranks                      # also ours over 2 ranks: data and tensor parallel
    python -m benchmarks.batch --smoke                      # tiny fixture checkpoint, ours only, seconds

One full-size random-weight checkpoint in mlx-vlm's format (``benchmarks.server.make_checkpoint``) and
one folder of random 1024 px JPEGs serve every system.  The checkpoint stores bfloat16, as the published
conversions do (``--weights float32`` writes a float32 one); every system computes in float32.  Each run is
its own process:

- ours: ``python -m fastvlm_mlx.batch`` exactly as a user runs it (its summary line gives images/s,
  from the loaded model to the last record); with ``--ranks`` the same command as two ranks on
  127.0.0.1 (``--parallel data`` and ``--parallel tensor``);
- mlxvlm: mlx-vlm's ``batch_generate`` on chunks of ``batch`` image paths, same optimized BLAS, its model
  cast to float32 after loading (MLX's CPU half-precision matmuls are its slower choice);
- hf: transformers' ``FastVlmForConditionalGeneration.generate`` on batches of the decoded, resized
  pictures (random weights; ``min_new_tokens`` keeps every answer at the full length).

The peers are slow on a CPU, so ``--peer-images`` (default 8) bounds how many pictures they caption;
images/s is the figure compared.  Every answer is ``--max-tokens`` long unless the random weights pick
an end-of-turn token (the generated token counts are reported beside each figure).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .run import _machine

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Describe the image."


def picture_folder(folder: Path, n: int, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(path, quality=90)
    return folder


def run_ours(model: Path, folder: Path, batch: int, max_tokens: int, ranks: int = 1, parallel: str = "data") -> dict:
    with tempfile.TemporaryDirectory(prefix="fastvlm-bench-batch-") as scratch:
        return _run_ours(Path(scratch) / "out.jsonl", model, folder, batch, max_tokens, ranks, parallel)


def _run_ours(out: Path, model: Path, folder: Path, batch: int, max_tokens: int, ranks: int, parallel: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fastvlm_mlx.batch",
        "--model",
        str(model),
        "--input",
        str(folder),
        "--output",
        str(out),
        "--prompt",
        PROMPT,
        "--batch-size",
        str(batch),
        "--max-tokens",
        str(max_tokens),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if ranks == 1:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200, cwd=ROOT)
        stderr = proc.stderr
    else:
        from fastvlm_mlx.distributed import local_hosts  # not at the top: the torch worker imports no MLX

        hostfile = out.with_name("hosts.json")
        hostfile.write_text(json.dumps(local_hosts(ranks)))
        procs = [
            subprocess.Popen(
                cmd + ["--parallel", parallel],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
            )
            for r in range(ranks)
        ]
        try:
            stderr = procs[0].communicate(timeout=7200)[1]
            for p in procs[1:]:
                p.communicate(timeout=120)
        finally:
            for p in procs:
                p.kill()
    m = re.search(r"([\d.]+) images/s", stderr)
    if not m:
        raise RuntimeError(f"no summary line from fastvlm_mlx.batch:\n{stderr[-2000:]}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        raise RuntimeError(f"fastvlm_mlx.batch failed on {len(errors)} images: {errors[0]}")
    return dict(
        images=len(records),
        images_per_s=float(m.group(1)),
        generated_tokens=sum(r["generation_tokens"] for r in records),
    )


def run_mlxvlm(model: Path, paths: list, batch: int, max_tokens: int) -> dict:
    from fastvlm_mlx.cpu.blas import load_fast_blas

    load_fast_blas()  # the same BLAS as ours, before mlx.core
    import mlx.core as mx
    from mlx_vlm import batch_generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    mx.set_default_device(mx.cpu)
    lm, processor = load(str(model))
    lm.set_dtype(mx.float32)
    # the checkpoint carries the small test tokenizer; random weights pick ids beyond it, which mlx-vlm's
    # detokenizer (run after the timed generation of each chunk) cannot look up: give them a string
    tokenmap = getattr(processor.detokenizer, "tokenmap", None)
    vocab = lm.config.text_config.vocab_size
    if tokenmap is not None and len(tokenmap) < vocab:
        tokenmap.extend(["a"] * (vocab - len(tokenmap)))
    prompt = apply_chat_template(processor, lm.config, PROMPT, num_images=1)
    batch_generate(lm, processor, images=paths[:1], prompts=[prompt], max_tokens=2)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        r = batch_generate(lm, processor, images=chunk, prompts=[prompt] * len(chunk), max_tokens=max_tokens)
        tokens += int(r.stats.generation_tokens) if hasattr(r.stats, "generation_tokens") else 0
    wall = time.perf_counter() - t0
    return dict(images=len(paths), images_per_s=len(paths) / wall, generated_tokens=tokens)


def run_hf(size: str, paths: list, batch: int, max_tokens: int, resolution: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from .peers import build_hf
    from .shapes import prompt_ids

    model = build_hf(size, resolution)
    cfg = model.config
    pre, post = prompt_ids(cfg.text_config.vocab_size)
    ids = pre + [cfg.image_token_id] * ((resolution // 64) ** 2) + post

    def pixels(chunk):
        arrays = [
            np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution)), dtype=np.float32) / 255
            for p in chunk
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def run(chunk, n_tokens):
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([ids] * len(chunk)),
                pixel_values=pixels(chunk),
                attention_mask=torch.ones(len(chunk), len(ids), dtype=torch.long),
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                do_sample=False,
            )
        return (out.shape[1] - len(ids)) * len(chunk)

    run(paths[:1], 2)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(paths), batch):
        tokens += run(paths[i : i + batch], max_tokens)
    wall = time.perf_counter() - t0
    return dict(
        images=len(paths),
        images_per_s=len(paths) / wall,
        generated_tokens=tokens,
        torch_threads=torch.get_num_threads(),
    )


def _peer_process(system: str, spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.batch", "--worker", system, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=7200,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument(
        "--weights",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="what the random-weight checkpoint stores (every system computes in float32)",
    )
    p.add_argument("--images", type=int, default=32, help="pictures ours captions")
    p.add_argument("--peer-images", type=int, default=8, help="pictures each peer captions")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--peers", default="")
    p.add_argument("--ranks", action="store_true", help="also ours over 2 ranks on 127.0.0.1 (data, tensor)")
    p.add_argument("--smoke", action="store_true", help="the tiny fixture checkpoint, ours only")
    p.add_argument("--worker", nargs=2, metavar=("SYSTEM", "SPEC"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        system, spec = a.worker[0], json.loads(a.worker[1])
        paths = sorted(str(x) for x in Path(spec["folder"]).glob("*.jpg"))[: spec["images"]]
        if system == "mlxvlm":
            result = run_mlxvlm(Path(spec["model"]), paths, spec["batch"], spec["max_tokens"])
        else:
            result = run_hf(spec["size"], paths, spec["batch"], spec["max_tokens"], spec["resolution"])
        print(json.dumps(result))
        return 0

    peers = [x for x in a.peers.split(",") if x]
    if any(x not in ("mlxvlm", "hf") for x in peers):
        p.error(f"unknown peer in {a.peers!r} (mlxvlm, hf)")
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    if a.smoke:
        model, a.resolution, a.images, a.max_tokens = ROOT / "tests" / "fixtures" / "format_c", 128, 4, 8
        peers, sizes = [], [1, 2]
    else:
        from .server import make_checkpoint

        default = Path(f"/tmp/fastvlm-bench-{a.model_size}" + ("" if a.weights == "float32" else f"-{a.weights}"))
        model = make_checkpoint(a.checkpoint or default, a.model_size, a.weights)
    base = Path(tempfile.gettempdir()) / f"fastvlm-bench-pictures-{a.resolution}"
    folder = picture_folder(base, max(a.images, a.peer_images), a.resolution)
    with tempfile.TemporaryDirectory(prefix="fastvlm-bench-") as scratch:
        return _compare(a, argv, model, folder, Path(scratch), peers, sizes)


def _compare(a, argv, model: Path, folder: Path, scratch: Path, peers: list, sizes: list) -> int:
    """Ours and the peers at every batch size, on links to the first pictures of ``folder`` under ``scratch``."""
    ours_folder, peer_folder = scratch / "ours", scratch / "peer"
    ours_folder.mkdir()
    peer_folder.mkdir()
    for x in sorted(folder.glob("*.jpg"))[: a.images]:
        (ours_folder / x.name).symlink_to(x)
    for x in sorted(folder.glob("*.jpg"))[: a.peer_images]:
        (peer_folder / x.name).symlink_to(x)

    print(
        json.dumps(
            dict(
                benchmark="fastvlm-batch",
                command=" ".join(["python -m benchmarks.batch"] + (argv or sys.argv[1:])),
                date=time.strftime("%Y-%m-%d %H:%M"),
                machine=_machine(),
                model_size=a.model_size,
                resolution=a.resolution,
                max_tokens=a.max_tokens,
                weights=None if a.smoke else a.weights,
            )
        ),
        flush=True,
    )
    rows = []
    for batch in sizes:
        row = dict(batch=batch, ours=run_ours(model, ours_folder, batch, a.max_tokens))
        print(json.dumps(dict(system="ours", **row["ours"], batch=batch)), flush=True)
        for peer in peers:
            spec = dict(
                model=str(model),
                folder=str(peer_folder),
                images=a.peer_images,
                batch=batch,
                max_tokens=a.max_tokens,
                size=a.model_size,
                resolution=a.resolution,
            )
            row[peer] = _peer_process(peer, spec)
            print(json.dumps(dict(system=peer, **row[peer], batch=batch)), flush=True)
        rows.append(row)
    if a.ranks:
        top = max(sizes)
        for mode in ("data", "tensor"):
            r = run_ours(model, ours_folder, top, a.max_tokens, ranks=2, parallel=mode)
            print(json.dumps(dict(system=f"ours 2 ranks {mode}", batch=top, **r)), flush=True)
            rows.append({"batch": top, f"ours 2 ranks {mode}": r})

    print(f"\n{'batch':>5}  {'system':<22} {'images':>6} {'img/s':>8} {'tokens':>7}  ours / this", file=sys.stderr)
    for row in rows:
        ours = row.get("ours")
        for name, r in row.items():
            if name == "batch":
                continue
            if "error" in r:
                print(f"{row['batch']:>5}  {name:<22} error: {r['error']}", file=sys.stderr)
                continue
            ratio = f"{ours['images_per_s'] / r['images_per_s']:.2f}x" if ours and name != "ours" else ""
            print(
                f"{row['batch']:>5}  {name:<22} {r['images']:>6} {r['images_per_s']:>8.3f} "
                f"{r['generated_tokens']:>7}  {ratio}",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
