"""Fine-tuning against PyTorch: the loss of step 0 and one step's LoRA gradients equal what transformers'
FastVlmForConditionalGeneration gives on the same example (tests/fixtures/make_lora_reference.py).

The example goes through our own data path (a JSONL line, ``read_split``, ``Batches``, ``make_loss``); the
reference used the same token ids and loss mask, which the test checks first.  The 1e-4 agreement is a float32
claim, so the model is loaded in float32 in every lane (CI's float16 lane included)."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import FIXTURES, PHOTO
from mlx.utils import tree_flatten

from fastvlm_mlx import lora
from fastvlm_mlx.model import IMAGE_PLACEHOLDER
from fastvlm_mlx.tuning.data import read_split
from fastvlm_mlx.tuning.trainer import PROJECTED, Batches, FeatureStore, make_loss, make_trainable

MODEL = str(FIXTURES / "format_a")
TOL = 1e-4


@pytest.fixture(scope="module")
def torch_reference():
    meta = json.loads((FIXTURES / "lora_reference.json").read_text())
    return meta, mx.load(str(FIXTURES / "lora_reference.safetensors"))


@pytest.fixture
def example(tmp_path, monkeypatch, torch_reference):
    """(model, loss, batch) in float32 for the reference's example, read from a JSONL line."""
    monkeypatch.setenv("FASTVLM_MLX_DTYPE", "float32")
    meta, tensors = torch_reference
    model, processor = lora.load_for_training(MODEL)
    assert model.language_model.model.norm.weight.dtype == mx.float32
    question = [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "Describe the image."}]
    line = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": meta["answer"]}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(line) + "\n")
    n = model.config.num_image_tokens
    (example,), problems = read_split(tmp_path / "train.jsonl", processor, n)
    assert not problems

    # the same example as the reference's: ids (each image expanded to its positions) and loss mask
    ids, covered = [], []
    for token, label in zip(example.ids, example.labels):
        count = n if token == IMAGE_PLACEHOLDER else 1
        ids += [meta["image_token_id_hf"] if token == IMAGE_PLACEHOLDER else token] * count
        covered += [label] * count
    assert ids == tensors["ids_hf"].tolist()
    assert covered == [label != -100 for label in tensors["labels"].tolist()]

    reference_pixels = mx.load(str(FIXTURES / "reference.safetensors"))["pixels"]
    assert mx.abs(processor.preprocess(str(PHOTO)) - reference_pixels).max().item() <= 1e-6

    store = FeatureStore(model, processor, PROJECTED, 1 << 20)
    batch = Batches(store, n).batch([example])
    return model, make_loss(PROJECTED), batch


def lora_parameters(meta: dict) -> dict:
    return {"rank": meta["rank"], "scale": meta["scale"], "dropout": 0.0, "keys": meta["keys"]}


def rel_err(ours: mx.array, theirs: mx.array) -> float:
    return (mx.abs(ours - theirs).max() / mx.abs(theirs).max()).item()


def test_step0_loss_is_transformers_masked_cross_entropy(example, torch_reference):
    meta, tensors = torch_reference
    model, loss, batch = example
    base, tokens = loss(model, *batch)
    assert int(tokens.item()) == (tensors["labels"] != -100).sum().item()
    assert base.item() == pytest.approx(meta["loss_base"], rel=TOL)

    # with LoRA layers made as training makes them (B at zero), step 0 is still the base model
    make_trainable(model, "lora", -1, lora_parameters(meta))
    step0, _ = loss(model, *batch)
    assert step0.item() == pytest.approx(meta["loss_base"], rel=TOL)


@pytest.mark.parametrize("case", ["step0", "lora"])
def test_lora_gradients_are_pytorchs(example, torch_reference, case):
    """The gradients of every A and B, at B zero (mlx-lm's start) and at a non-zero B, equal PyTorch's for the
    same A, B and scale."""
    meta, tensors = torch_reference
    model, loss, batch = example
    make_trainable(model, "lora", -1, lora_parameters(meta))
    start = {k[len(case) + 1 :]: v for k, v in tensors.items() if k.startswith(case + ".language_model.")}
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == set(start)
    model.load_weights(list(start.items()), strict=False)

    value, grads = nn.value_and_grad(model, loss)(model, *batch)
    assert value[0].item() == pytest.approx(meta[f"loss_{case}"], rel=TOL)
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(start)
    for key, grad in grads.items():
        expected = tensors[f"{case}.grad.{key}"]
        if case == "step0" and key.endswith("lora_a"):  # B at zero: nothing flows back to A
            assert mx.abs(expected).max().item() == 0.0 and mx.abs(grad).max().item() == 0.0, key
            continue
        assert rel_err(grad, expected) <= TOL, (key, rel_err(grad, expected))
