"""Make the demo model in ``examples/demo/model``: a tiny FastVLM that names the shape in a drawing.

A small model that really answers lets the README's first commands run without a download, and shows the whole
fine-tuning path on a task anyone can check by eye.  The script uses only the project's own commands, as a user
would:

1. draws images of one filled black shape (circle, square, triangle or cross, its size and place jittered) on
   white, deterministically: ``train.jsonl`` and ``valid.jsonl`` in LLaVA's format go to the work folder, and the
   held-out ``test.jsonl`` (lines that also carry ``question`` and ``answer``, the format of
   ``python -m fastvlm_mlx.eval``) with its images in ``test/`` goes here, beside one sample image per shape in
   ``images/``;
2. writes the base model: the tiny test fixture (``tests/fixtures/format_a``: random weights, 256 px) with its
   vision tower drawn again as timm initialises FastViT (layer scales 1e-5, zero biases; LeCun-normal weights),
   since the fixture's tower gives nearly the same output for every image of this kind (its biases dominate),
   then scaled part by part so that each part's output has unit size on some drawings (as LSUV does; its output
   would otherwise be about 1e-6, which float16 cannot hold); the projector is set from the tower's output on
   those drawings, so that its input is standardised and its output is the size of the token embeddings (larger
   image embeddings overflow float16);
3. fully fine-tunes that base with ``python -m fastvlm_mlx.lora -c train.yaml`` (the tower frozen, so each image
   is encoded once and every later step costs only the projector and the decoder);
4. fuses the trained weights into a model directory in float16 with ``python -m fastvlm_mlx.fuse``;
5. scores the model on the held-out split with ``python -m fastvlm_mlx.eval``.

Chance is 1/4.  Run from the repository root::

    python examples/demo/make_demo.py

The training data and the adapters go to ``examples/demo/work`` (not committed); rerunning redraws the same images
and trains the same model.
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
TRAIN_CONFIG = HERE / "train.yaml"

SHAPES = ("circle", "square", "triangle", "cross")
QUESTION = "Which shape is it?"
IMAGE_SIZE = 256  # the fixture's (config.json: mobileclip_l_256)
SPLITS = {"train": (3000, 1), "valid": (100, 2), "test": (200, 3)}  # images and the seed that draws them
SAMPLE_SEED = 100  # SHAPES[i]'s sample is drawn with SAMPLE_SEED + i
EVAL_FLAGS = ["--metric", "exact_match", "--instruction", ""]  # the question as the model was trained on it


def draw(shape: str, rng: random.Random) -> Image.Image:
    """One filled black ``shape`` on white, its size and place drawn from ``rng``."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.32, 0.38) * IMAGE_SIZE
    x, y = (IMAGE_SIZE / 2 + rng.uniform(-0.03, 0.03) * IMAGE_SIZE for _ in range(2))
    ink = (0, 0, 0)
    if shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif shape == "square":
        s = 0.85 * r
        pen.rectangle([x - s, y - s, x + s, y + s], fill=ink)
    elif shape == "triangle":
        pen.polygon([(x, y - r), (x - 0.95 * r, y + 0.8 * r), (x + 0.95 * r, y + 0.8 * r)], fill=ink)
    elif shape == "cross":
        w = 0.33 * r
        pen.rectangle([x - r, y - w, x + r, y + w], fill=ink)
        pen.rectangle([x - w, y - r, x + w, y + r], fill=ink)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def items(count: int, seed: int):
    """``count`` deterministic (image, question, answer) triples."""
    rng = random.Random(seed)
    for _ in range(count):
        shape = rng.choice(SHAPES)
        yield draw(shape, rng), QUESTION, shape


def sample(i: int) -> Image.Image:
    """The committed sample image of ``SHAPES[i]``."""
    return draw(SHAPES[i], random.Random(SAMPLE_SEED + i))


def write_video(path: Path, fps: int = 10) -> None:
    """A clip that shows each sample for one second, in ``SHAPES`` order: the video commands' demo (needs PyAV)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width = stream.height = IMAGE_SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(len(SHAPES)):
            frame = av.VideoFrame.from_ndarray(np.asarray(sample(i)), format="rgb24")
            for _ in range(fps):
                container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_split(data_file: Path, image_folder: str, count: int, seed: int) -> None:
    """``data_file`` (LLaVA lines with ``question`` and ``answer`` too) and its images in ``image_folder`` beside it."""
    name = data_file.stem
    (data_file.parent / image_folder).mkdir(parents=True, exist_ok=True)
    with open(data_file, "w", encoding="utf-8") as out:
        for i, (image, question, answer) in enumerate(items(count, seed)):
            path = f"{image_folder}/{name}_{i:05d}.png"
            image.save(data_file.parent / path, optimize=True)
            conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            line = {"id": f"{name}_{i}", "image": path, "question": question, "answer": answer}
            out.write(json.dumps({**line, "conversations": conversation}) + "\n")


def write_base(directory: Path, seed: int = 0) -> None:
    """The fixture with a freshly drawn vision tower and a projector fitted to it, as a model directory in this
    project's format."""
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
    pixels = mx.concatenate([preprocess(image, IMAGE_SIZE) for image, _, _ in items(128, 1000 + seed)])
    # Without batch norms the drawn tower's output shrinks part by part (each GELU near 0 halves it) to about 1e-6,
    # which float16 cannot hold: each part's output is brought to unit size, as LSUV does layer by layer.
    x = pixels
    for name, part in model.vision_tower.parts():
        layer = scale_layer(name, part)
        for _ in range(4):  # the part is not linear in the layer's weight (GELU, squeeze-excite): a few rounds
            layer.weight = layer.weight / rms(part(x))
        x = part(x)
    # Data-dependent init of the projector (as LSUV does): its first layer sees the tower's output standardised
    # over drawings of the task, so the image-dependent part is not drowned by what every image shares; its second
    # layer is scaled so that image embeddings are as large as token embeddings.
    features = x.reshape(-1, model.config.mm_hidden_size)
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = mx.maximum(std, 0.1 * std.mean())  # channels that barely vary are not blown up
    first, second = model.projector.linear_1, model.projector.linear_2
    first.weight = first.weight / std
    first.bias = first.bias - first.weight @ mean
    embedded = model.projector(features)
    tokens = model.language_model.model.embed_tokens.weight
    scale = rms(tokens) / rms(embedded)
    second.weight, second.bias = second.weight * scale, second.bias * scale
    with atomic_directory(directory, force=True) as tmp:
        save_weights(dict(tree_flatten(model.parameters())), tmp)
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        copy_present(FIXTURE, tmp, SIDE_FILES)


def scale_layer(name: str, part):
    """The layer of a tower part whose weight sets the size of the part's output (its bias is zero, and the layer
    scales keep the blocks' MLPs out of the way)."""
    if name == "stem":
        return part.layers[-1]
    if name == "final_conv":
        return part.conv
    return part.pos_emb if part.pos_emb is not None else part.blocks[-1].token_mixer


def rms(x):
    """Root mean square of all of ``x``'s entries."""
    return (x * x).mean().sqrt()


def run(*args: str) -> None:
    """A project command, exactly as a user types it."""
    command = [sys.executable, "-m", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="Where the training data and adapters go.")
    parser.add_argument("--skip-train", action="store_true", help="Reuse the adapters already in --work.")
    args = parser.parse_args()
    data, base, adapters = args.work / "data", args.work / "base", args.work / "adapters"
    for folder in (data, HERE / "test"):
        if folder.exists():
            shutil.rmtree(folder)
    for name in ("train", "valid"):
        write_split(data / f"{name}.jsonl", "images", *SPLITS[name])
    write_split(HERE / "test.jsonl", "test", *SPLITS["test"])
    SAMPLES_DIR.mkdir(exist_ok=True)
    for i, shape in enumerate(SHAPES):
        sample(i).save(SAMPLES_DIR / f"{shape}.png", optimize=True)
    write_video(HERE / "shapes.mp4")
    if not args.skip_train:
        write_base(base)
        started = time.perf_counter()
        run("fastvlm_mlx.lora", "-c", str(TRAIN_CONFIG), "--model", str(base), "--data", str(data),
            "--adapter-path", str(adapters))  # fmt: skip
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    run("fastvlm_mlx.fuse", "--model", str(base), "--adapter-path", str(adapters),
        "--save-path", str(MODEL_DIR), "--dtype", "float16", "--force")  # fmt: skip
    run("fastvlm_mlx.eval", "--model", str(MODEL_DIR), "--data", str(HERE / "test.jsonl"), *EVAL_FLAGS,
        "--output", str(args.work / "test.predictions.jsonl"))  # fmt: skip


if __name__ == "__main__":
    main()
