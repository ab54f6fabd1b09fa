"""Training benchmark: LoRA fine-tuning examples/s and peak memory, ours beside mlx-vlm's trainer, in one run.

    python -m benchmarks.train --peers mlxvlm               # 0.5B, 1024 px, 256 examples, 2 epochs, batch 4
    python -m benchmarks.train --peers mlxvlm --examples 32 --epochs 1   # a shorter run, same shapes
    python -m benchmarks.train --smoke                      # tiny fixture checkpoint, ours only, seconds (CI)

One full-size random-weight checkpoint in mlx-vlm's format (``benchmarks.server.make_checkpoint``), which both
trainers load.  One synthetic data set: ``--examples`` distinct random pictures (``benchmarks.batch.picture_folder``)
each with a short question and answer, written twice, as the same conversations: ours (``{"messages": [...]}``
with an image part) and mlx-vlm's (``{"images": [path], "messages": [...]}`` with plain-text turns).  A
validation split of one batch is given to both (ours needs one; mlx-vlm then validates once, at the end).

Each trainer runs as its own process, exactly as a user runs it: ``python -m fastvlm_mlx.lora`` and
``python -m mlx_vlm.train``, LoRA (rank 8) on every linear layer of every decoder layer (both trainers' default
keys), Adam, the same learning rate, seed, batch size and number of steps (epochs x examples / batch).
examples/s = examples trained / training wall time, where training wall time runs from the first line the
trainer prints once its data and model are ready (ours: the header of mlx-lm's progress table, mlx-vlm: its
tqdm "Training" bar) to the process's exit, so it counts image loading, the vision tower, validation and the
final save.  Peak memory: the process's peak RSS (``os.wait4``), the same yardstick for both; mlx-vlm's own
``mx.get_peak_memory`` report and step times are recorded beside it (mlx-lm's progress table, which ours
prints, shows neither).  A trainer that fails has its last error line as its result.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .run import _machine, _versions

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = (
    ("What colour dominates the picture?", "Mostly grey noise with speckles of every colour."),
    ("How many objects are in the image?", "There are no distinct objects, only random pixels."),
    ("Describe the image in one sentence.", "A square of random coloured noise."),
    ("Is there any text in the picture?", "No, there is no readable text."),
)
PEERS = ("mlxvlm",)


def write_data(folder: Path, pictures: list, valid: int) -> dict:
    """The same conversations in ours and mlx-vlm's JSONL layouts: {"ours": dir, "mlxvlm": dir}."""
    out = {"ours": folder / "ours", "mlxvlm": folder / "mlxvlm"}
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
    splits = {"train": pictures, "valid": pictures[:valid]}
    for split, paths in splits.items():
        ours, peer = [], []
        for i, path in enumerate(paths):
            question, answer = QUESTIONS[i % len(QUESTIONS)]
            image = str(Path(path).resolve())
            user = [{"type": "image", "image": image}, {"type": "text", "text": question}]
            ours.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
            turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            peer.append({"images": [image], "messages": turns})
        (out["ours"] / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
        mlxvlm_split = "valid" if split == "valid" else split
        (out["mlxvlm"] / f"{mlxvlm_split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in peer))
    return out


def command(system: str, model: Path, data: Path, adapters: Path, s: dict) -> list:
    if system == "ours":
        return [
            sys.executable, "-m", "fastvlm_mlx.lora", "--model", str(model), "--data", str(data), "--train",
            "--fine-tune-type", "lora", "--num-layers", "-1", "--batch-size", str(s["batch_size"]),
            "--epochs", str(s["epochs"]), "--learning-rate", str(s["learning_rate"]), "--optimizer", "adam",
            "--seed", "0", "--val-batches", "1", "--steps-per-report", "1", "--steps-per-eval", str(s["iters"]),
            "--save-every", str(s["iters"]), "--adapter-path", str(adapters),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "mlx_vlm.train", "--model", str(model), "--data", str(data),
        "--train-type", "lora", "--lora-rank", "8", "--batch-size", str(s["batch_size"]),
        "--epochs", str(s["epochs"]), "--learning-rate", str(s["learning_rate"]), "--optimizer", "adam",
        "--seed", "0", "--val-batches", "1", "--steps-per-report", "1", "--steps-per-eval", str(s["iters"]),
        "--steps-per-save", str(s["iters"]), "--train-on-completions", "--output-path", str(adapters),
    ]  # fmt: skip


START_MARKS = {"ours": "train_loss", "mlxvlm": "Training:"}  # the first line once model and data are ready
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_trainer(system: str, cmd: list, log: Path, timeout: float) -> dict:
    """Run one trainer; every output segment (lines, and tqdm's carriage-return updates) is timestamped."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if system != "ours":  # the same optimized BLAS that fastvlm_mlx loads for itself
        from fastvlm_mlx import BLAS_LIBRARY

        if BLAS_LIBRARY and os.path.isabs(BLAS_LIBRARY):
            env["LD_PRELOAD"] = BLAS_LIBRARY
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    segments = []

    def read():  # the log is written as the trainer goes, to follow a long run
        buf = b""
        with open(log, "w") as out:
            while chunk := proc.stdout.read1(65536):
                buf += chunk
                *done, buf = re.split(rb"[\r\n]", buf)
                now = time.perf_counter() - t0
                for s in done:
                    if s.strip():
                        segments.append((now, ANSI.sub("", s.decode(errors="replace"))))
                        out.write(f"{now:9.2f} {segments[-1][1]}\n")
                out.flush()
            if buf.strip():
                segments.append((time.perf_counter() - t0, ANSI.sub("", buf.decode(errors="replace"))))
                out.write(f"{segments[-1][0]:9.2f} {segments[-1][1]}\n")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(30)
    rec = {"system": system, "returncode": proc.returncode, "wall_s": round(wall, 1)}
    rec["rss_peak_gb"] = round(usage.ru_maxrss * 1024 / 1e9, 3)  # Linux: KiB
    start = next((t for t, s in segments if START_MARKS[system] in s), None)
    if proc.returncode != 0 or start is None:
        errors = [s for _, s in segments if re.search(r"error|exception|Error", s)]
        rec["error"] = (errors or [s for _, s in segments] or ["no output"])[-1].strip()[:500]
        rec["log"] = str(log)
        return rec
    rec["load_s"] = round(start, 1)
    rec["train_wall_s"] = round(wall - start, 1)
    rec.update(reported(system, [s for _, s in segments]))
    return rec


def reported(system: str, lines: list) -> dict:
    """What mlx-vlm's trainer says of itself: steps, the sum of its step times (its data time excluded) and its
    last ``mx.get_peak_memory`` report.  Ours prints mlx-lm's progress table, which has neither figure."""
    if system == "ours":
        return {}
    steps = []
    for s in lines:  # "train_loss=L, ..., step_time=T, ..., peak_memory=M" (four pairs a line)
        steps.extend(re.findall(r"\bstep_time=([-\d.e+]+)", s))
    peaks = [m for s in lines for m in re.findall(r"\bpeak_memory=([-\d.e+]+)", s)]
    return {
        "reported_steps": len(steps),
        "reported_step_s": round(sum(float(t) for t in steps), 2),
        "mlx_peak_gb": round(float(peaks[-1]), 3) if peaks else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--checkpoint", type=Path, default=None, help="a full-size random-weight checkpoint to reuse")
    p.add_argument("--examples", type=int, default=256, help="training examples (distinct pictures)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--peers", default="", help="mlxvlm: also mlx-vlm's trainer")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds each trainer may run")
    p.add_argument("--smoke", action="store_true", help="the tiny fixture checkpoint, ours only")
    a = p.parse_args(argv)
    peers = [x for x in a.peers.split(",") if x]
    if any(x not in PEERS for x in peers):
        p.error(f"unknown peer in {a.peers!r} ({', '.join(PEERS)})")
    from .batch import picture_folder

    if a.smoke:
        model, resolution = ROOT / "tests" / "fixtures" / "format_c", 256
        a.examples, a.epochs, a.batch_size = 8, 1, 2
        pictures_dir = None
    else:
        from .server import make_checkpoint

        model = make_checkpoint(a.checkpoint or Path(f"/tmp/fastvlm-bench-{a.model_size}"), a.model_size)
        resolution = 1024
        pictures_dir = Path(f"/tmp/fastvlm-bench-pictures-{resolution}")
    if a.examples < a.batch_size:
        p.error("--examples must be at least --batch-size")
    settings = dict(
        examples=a.examples,
        epochs=a.epochs,
        batch_size=a.batch_size,
        iters=a.epochs * math.ceil(a.examples / a.batch_size),
        learning_rate=a.learning_rate,
        resolution=resolution,
        lora="rank 8, every linear layer of every decoder layer",
    )
    header = dict(
        benchmark="fastvlm-train",
        command=" ".join(["python -m benchmarks.train"] + (argv if argv is not None else sys.argv[1:])),
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine=_machine(),
        versions=_versions(),
        model=str(model),
        model_size="smoke" if a.smoke else a.model_size,
        **settings,
    )
    print(json.dumps(header), flush=True)
    records = {}
    with tempfile.TemporaryDirectory(prefix="fastvlm-bench-train-") as scratch:
        scratch = Path(scratch)
        folder = picture_folder(pictures_dir or scratch / "pictures", a.examples, resolution)
        pictures = sorted(folder.glob("*.jpg"))[: a.examples]
        data = write_data(scratch / "data", pictures, a.batch_size)
        for system in ["ours"] + peers:
            cmd = command(system, model, data[system], scratch / f"adapters-{system}", settings)
            log = Path(tempfile.gettempdir()) / f"fastvlm-bench-train-{system}.log"
            rec = run_trainer(system, cmd, log, a.timeout)
            rec["command"] = " ".join(Path(c).name if c == sys.executable else c for c in cmd)
            if "error" not in rec:
                rec["examples_trained"] = settings["iters"] * a.batch_size
                rec["examples_per_s"] = round(rec["examples_trained"] / rec["train_wall_s"], 4)
            records[system] = rec
            print(json.dumps(rec), flush=True)
    lines = [f"{'system':<8} {'examples/s':>11} {'train wall s':>13} {'RSS peak GB':>12}"]
    for system, r in records.items():
        if "error" in r:
            lines.append(f"{system:<8} error: {r['error']}")
        else:
            lines.append(
                f"{system:<8} {r['examples_per_s']:>11.3f} {r['train_wall_s']:>13.1f} {r['rss_peak_gb']:>12.2f}"
            )
    for peer in peers:
        ours, theirs = records["ours"], records[peer]
        if "error" not in ours and "error" not in theirs:
            ratio = ours["examples_per_s"] / theirs["examples_per_s"]
            print(json.dumps({"ratio": f"ours/{peer}", "examples_per_s": round(ratio, 3)}), flush=True)
            lines.append(f"ours/{peer} examples/s: {ratio:.2f}x")
    print("\n".join(lines), file=sys.stderr)
    return 0 if "error" not in records["ours"] else 1


if __name__ == "__main__":
    sys.exit(main())
