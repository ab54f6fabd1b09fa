"""The committed demo model (examples/demo/model) answers its task: which shape a drawing shows.

It was fine-tuned by examples/demo/make_demo.py from the fixture's random weights, so its right answers can only come
from that training; greedy decoding makes them deterministic.  The labels come from the script's drawing function,
which also draws a fresh held-out set here (a seed the script never trains on).
"""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx import generate, load

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
HELD_OUT_SEED = 7  # make_demo's splits draw with seeds 1, 2 and 3
HELD_OUT_IMAGES = 60


def _make_demo():
    spec = importlib.util.spec_from_file_location("make_demo", DEMO / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_demo = _make_demo()


@pytest.fixture(scope="module")
def demo():
    return load(str(DEMO / "model"))


def answer(demo, question: str, image) -> str:
    model, processor = demo
    return generate(model, processor, question, image=image, max_tokens=8).strip()


def test_the_samples_are_the_scripts_drawings():
    """The committed images are what the drawing function makes, so their labels are known."""
    for i, (colour, shape) in enumerate(make_demo.SAMPLES):
        committed = np.asarray(Image.open(DEMO / "images" / f"{colour}_{shape}.png").convert("RGB"))
        drawn = np.asarray(make_demo.draw(colour, shape, random.Random(100 + i)))
        assert np.array_equal(committed, drawn), f"{colour}_{shape}.png differs from make_demo.draw"


@pytest.mark.parametrize(("colour", "shape"), make_demo.SAMPLES)
def test_it_names_the_shape_of_the_samples(demo, colour, shape):
    assert answer(demo, make_demo.QUESTION, str(DEMO / "images" / f"{colour}_{shape}.png")) == shape


def test_held_out_accuracy_is_at_least_90_percent(demo):
    """Chance is 1/4 (four shapes, drawn uniformly)."""
    right = sum(answer(demo, q, image) == label for image, q, label in make_demo.items(HELD_OUT_IMAGES, HELD_OUT_SEED))
    assert right / HELD_OUT_IMAGES >= 0.9, f"{right}/{HELD_OUT_IMAGES} right"
