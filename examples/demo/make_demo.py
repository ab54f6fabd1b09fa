"""Make the demo model in ``examples/demo/model``: a tiny FastVLM that names the shape in a drawing.

A small model that really answers lets the README's first commands run without a download, and shows the whole
fine-tuning path on a task anyone can check by eye.  The script uses only the project's own commands, as a user
would:

1. draws images of one filled shape (circle, square, triangle or cross, in one of 6 colours, its size and place
   jittered) on white, deterministically, and writes ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (LLaVA
   lines that also carry ``question`` and ``answer``, so ``python -m fastvlm_mlx.eval --data test.jsonl`` reads
   the test split as it is);
2. writes the base model: the tiny test fixture (``tests/fixtures/format_a``: random weights, 256 px) with its
   vision tower drawn again as timm initialises FastViT (layer scales 1e-5, zero biases; LeCun-normal weights),
   since the fixture's tower gives nearly the same output for every image of this kind (its biases dominate);
3. fully fine-tunes that base on the data with
   ``python -m fastvlm_mlx.lora --fine-tune-type full --train-projector`` (the tower frozen, so each image is
   encoded once and every later step costs only the projector and the decoder);
4. fuses the trained weights into a model directory in float16 with ``python -m fastvlm_mlx.fuse``;
5. answers the test split greedily with ``fastvlm_mlx.generate`` and prints the accuracy.

Chance is 1/4.  Run from the repository root::

    python examples/demo/make_demo.py

The data and the adapters go to ``examples/demo/work`` (not committed; rerunning redraws the same images).
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "format_a"
MODEL_DIR = HERE / "model"
WORK_DIR = HERE / "work"
SAMPLES_DIR = HERE / "images"

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 175),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTION = "Which shape is it?"
IMAGE_SIZE = 256  # the fixture's (config.json: mobileclip_l_256)
SPLITS = {"train": (3000, 1), "valid": (100, 2), "test": (300, 3)}  # images and the seed that draws them
SAMPLES = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("orange", "cross"))

TRAIN_FLAGS = [
    "--fine-tune-type", "full", "--num-layers", "-1", "--train-projector",
    "--batch-size", "16", "--iters", "2000", "--learning-rate", "5e-3",
    "--steps-per-report", "100", "--steps-per-eval", "250", "--val-batches", "-1", "--save-every", "500",
]  # fmt: skip


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """One filled shape of ``colour`` on white, its size and place drawn from ``rng``."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.32, 0.38) * IMAGE_SIZE
    x, y = (IMAGE_SIZE / 2 + rng.uniform(-0.03, 0.03) * IMAGE_SIZE for _ in range(2))
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        pen.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif shape == "triangle":
        pen.polygon([(x, y - r), (x - 0.95 * r, y + 0.8 * r), (x + 0.95 * r, y + 0.8 * r)], fill=fill)
    elif shape == "cross":
        w = 0.33 * r
        pen.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        pen.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def items(count: int, seed: int):
    """``count`` deterministic (image, question, answer) triples."""
    rng = random.Random(seed)
    for _ in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        yield draw(colour, shape, rng), QUESTION, shape


def write_split(folder: Path, name: str, count: int, seed: int) -> None:
    """``folder/name.jsonl`` and its images under ``folder/images/``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as out:
        for i, (image, question, answer) in enumerate(items(count, seed)):
            path = f"images/{name}_{i:05d}.png"
            image.save(folder / path)
            conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            line = {"id": f"{name}_{i}", "image": path, "question": question, "answer": answer}
            out.write(json.dumps({**line, "conversations": conversation}) + "\n")


def write_base(directory: Path, seed: int = 0) -> None:
    """The fixture with a freshly drawn vision tower, as a model directory in this project's format."""
    import math

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from fastvlm_convert.writer import SIDE_FILES, atomic_directory, copy_present, save_weights
    from fastvlm_mlx.checkpoints import read_checkpoint
    from fastvlm_mlx.image import preprocess
    from fastvlm_mlx.loader import build_model

    config, weights = read_checkpoint(FIXTURE)
    model = build_model(config, weights, str(FIXTURE))
    mx.random.seed(seed)
    drawn = []
    for name, value in tree_flatten(model.vision_tower.parameters()):
        if name.endswith("bias"):
            drawn.append((name, mx.zeros_like(value)))
        elif "layer_scale" in name:
            drawn.append((name, mx.full(value.shape, 1e-5)))
        elif value.ndim >= 2:  # (out, ..., in): fan-in is all but the first axis
            fan_in = math.prod(value.shape[1:])
            drawn.append((name, mx.random.normal(value.shape) * math.sqrt(1.0 / fan_in)))
    model.vision_tower.load_weights(drawn, strict=False)
    # Data-dependent init of the projector's first layer (as LSUV does): it sees the tower's output standardised
    # over drawings of the task, so the image-dependent part is not drowned by what every image shares.
    pixels = mx.concatenate([preprocess(image, IMAGE_SIZE) for image, _, _ in items(128, 1000 + seed)])
    features = model.vision_tower(pixels).reshape(-1, model.config.mm_hidden_size)
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = mx.maximum(std, 0.1 * std.mean())  # channels that barely vary are not blown up
    first = model.projector.linear_1
    first.weight = first.weight / std
    first.bias = first.bias - first.weight @ mean
    with atomic_directory(directory, force=True) as tmp:
        save_weights(dict(tree_flatten(model.parameters())), tmp)
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        copy_present(FIXTURE, tmp, SIDE_FILES)


def run(*args: str) -> None:
    """A project command, exactly as a user types it."""
    command = [sys.executable, "-m", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def accuracy(model_dir: Path, test_file: Path) -> dict:
    """Greedy answers to the test split: the fraction right overall and per question."""
    from fastvlm_mlx import generate, load

    model, processor = load(str(model_dir))
    right, total = {}, {}
    for line in test_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answer = generate(model, processor, row["question"], image=str(test_file.parent / row["image"]), max_tokens=8)
        right[row["question"]] = right.get(row["question"], 0) + (answer.strip() == row["answer"])
        total[row["question"]] = total.get(row["question"], 0) + 1
    scores = {q: right[q] / total[q] for q in total}
    scores["all"] = sum(right.values()) / sum(total.values())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="Where the data and the adapters go.")
    parser.add_argument("--skip-train", action="store_true", help="Reuse the adapters already in --work.")
    args = parser.parse_args()
    data, base, adapters = args.work / "data", args.work / "base", args.work / "adapters"
    if data.exists():
        shutil.rmtree(data)
    for name, (count, seed) in SPLITS.items():
        write_split(data, name, count, seed)
    SAMPLES_DIR.mkdir(exist_ok=True)
    for i, (colour, shape) in enumerate(SAMPLES):
        draw(colour, shape, random.Random(100 + i)).save(SAMPLES_DIR / f"{colour}_{shape}.png")
    if not args.skip_train:
        write_base(base)
        started = time.perf_counter()
        run("fastvlm_mlx.lora", "--model", str(base), "--data", str(data), "--train",
            "--adapter-path", str(adapters), *TRAIN_FLAGS)  # fmt: skip
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    run("fastvlm_mlx.fuse", "--model", str(base), "--adapter-path", str(adapters),
        "--save-path", str(MODEL_DIR), "--dtype", "float16", "--force")  # fmt: skip
    scores = accuracy(MODEL_DIR, data / "test.jsonl")
    for question, score in scores.items():
        print(f"held-out accuracy ({question}): {score:.1%}")


if __name__ == "__main__":
    main()
