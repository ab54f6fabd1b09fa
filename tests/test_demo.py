"""The committed demo model (examples/demo/model) answers its task: which shape a drawing shows.

It was fully fine-tuned by examples/demo/make_demo.py from random weights (the fixture's decoder, a freshly drawn
tower), so its right answers can only come from that training; greedy decoding makes them deterministic.  The
labels come from the script's drawing function, never from the model: the committed sample images and held-out
split are checked to be exactly what it draws for each label.
"""

import importlib.util
import json

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

DEMO = ROOT / "examples" / "demo"
MODEL = DEMO / "model"
TEST_FILE = DEMO / "test.jsonl"


def _make_demo():
    spec = importlib.util.spec_from_file_location("make_demo", DEMO / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_demo = _make_demo()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_the_samples_and_the_held_out_split_are_the_scripts_drawings():
    """So their labels are known independently of the model; the held-out seed is not a training seed."""
    for i, shape in enumerate(make_demo.SHAPES):
        committed = Image.open(DEMO / "images" / f"{shape}.png")
        assert np.array_equal(pixels(committed), pixels(make_demo.sample(i))), f"{shape}.png differs from the script's"
    count, seed = make_demo.SPLITS["test"]
    assert seed not in {make_demo.SPLITS[name][1] for name in ("train", "valid")}
    rows = [json.loads(line) for line in TEST_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == count
    for row, (image, question, answer) in zip(rows, make_demo.items(count, seed)):
        assert (row["question"], row["answer"]) == (question, answer)
        assert np.array_equal(pixels(Image.open(DEMO / row["image"])), pixels(image)), row["image"]


@pytest.mark.parametrize("shape", make_demo.SHAPES)
def test_generate_names_the_shape_of_each_sample(shape):
    image = DEMO / "images" / f"{shape}.png"
    proc = run_cli("fastvlm_mlx.generate", "--model", str(MODEL), "--image", str(image), "--prompt", make_demo.QUESTION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == shape


def test_eval_scores_the_held_out_split_at_least_90_percent(tmp_path):
    """Chance is 1/4 (four shapes, drawn uniformly)."""
    output = tmp_path / "predictions.jsonl"
    proc = run_cli(
        "fastvlm_mlx.eval",
        "--model",
        str(MODEL),
        "--data",
        str(TEST_FILE),
        *make_demo.EVAL_FLAGS,
        "--output",
        str(output),
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    right = sum(r["prediction"] == r["answers"][0] for r in records)  # recounted here from the predictions
    summary = json.loads((tmp_path / "predictions.summary.json").read_text(encoding="utf-8"))
    assert summary["score"] == right / len(records)
    assert f"exact_match: {100 * summary['score']:.2f} over {len(records)} items" in proc.stdout
    assert right / len(records) >= 0.9, f"{right}/{len(records)} right"


def test_the_demo_video_is_captioned_shape_by_shape_as_subtitles():
    """examples/demo/shapes.mp4 shows each sample for one second, in SHAPES order (make_demo.write_video)."""
    proc = run_cli(
        "fastvlm_mlx.generate", "--model", str(MODEL), "--video", str(DEMO / "shapes.mp4"), "--every", "1",
        "--prompt", make_demo.QUESTION, "--format", "srt",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cues = [block.splitlines() for block in proc.stdout.strip().split("\n\n")]
    assert [cue[0] for cue in cues] == ["1", "2", "3", "4"]
    assert [cue[1] for cue in cues] == [f"00:00:0{i},000 --> 00:00:0{i + 1},000" for i in range(4)]
    assert [cue[2] for cue in cues] == list(make_demo.SHAPES)
