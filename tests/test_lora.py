"""Fine-tuning (fastvlm_mlx.lora, fastvlm_mlx.tuning) on the tiny fixture: data in both formats, the loss mask,
bad lines, resuming, the image-feature cache, every fine-tune type."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2

from fastvlm_mlx import lora
from fastvlm_mlx.model import IMAGE_PLACEHOLDER
from fastvlm_mlx.processor import IM_END
from fastvlm_mlx.tuning.data import tokenize
from fastvlm_mlx.tuning.trainer import Batches, FeatureStore, make_loss, splice
from fastvlm_mlx.vision import FastViTHD

MODEL = str(FIXTURES / "format_a")
ANSWERS = {"a.png": "red square", "b.png": "blue circle"}


def openai_line(image: str, answer: str) -> dict:
    question = [{"type": "image", "image": f"imgs/{image}"}, {"type": "text", "text": "What is it?"}]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def llava_line(image: str, answer: str) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}]
    return {"id": image, "image": image, "conversations": turns}


def make_data(folder, style: str = "openai", n: int = 8):
    """A data folder whose answer depends on the image; images in folder/imgs."""
    (folder / "imgs").mkdir(parents=True)
    shutil.copy(PHOTO, folder / "imgs" / "a.png")
    shutil.copy(PHOTO2, folder / "imgs" / "b.png")
    make = openai_line if style == "openai" else llava_line
    rows = [make(image, ANSWERS[image]) for image in ["a.png", "b.png"] * (n // 2)]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


class Reports:
    """mlx-lm's training callback, keeping the reports."""

    def __init__(self, stop_after: int | None = None):
        self.val, self.train, self.stop_after = [], [], stop_after

    def on_val_loss_report(self, info):
        self.val.append((info["iteration"], info["val_loss"]))

    def on_train_loss_report(self, info):
        self.train.append((info["iteration"], info["train_loss"]))
        if self.stop_after is not None and info["iteration"] >= self.stop_after:
            raise KeyboardInterrupt  # the run is killed here


def run(tmp_path, callback=None, config=None, **given):
    given = {
        "model": MODEL,
        "data": str(tmp_path / "data"),
        "train": True,
        "num_layers": -1,
        "batch_size": 2,
        "iters": 4,
        "learning_rate": 1e-3,
        "steps_per_report": 1,
        "adapter_path": str(tmp_path / "adapters"),
        **given,
    }
    return lora.tune(lora.options(given, config), training_callback=callback, report=lambda line: None)


@pytest.mark.parametrize("style", ["openai", "llava"])
def test_training_lowers_the_validation_loss(tmp_path, style):
    make_data(tmp_path / "data", style)
    config = tmp_path / "config.yaml"
    config.write_text("lr_schedule:\n  name: cosine_decay\n  arguments: [2.0e-3, 24]\n  warmup: 2\n")
    extra = {"image_folder": str(tmp_path / "data" / "imgs")} if style == "llava" else {}
    reports = Reports()
    result = run(tmp_path, reports, str(config), iters=24, steps_per_eval=12, **extra)
    first, last = reports.val[0][1], reports.val[-1][1]
    assert reports.val[0][0] == 0 and len(reports.val) == 3  # before the first update, at 12 and at the end
    assert last < 0.5 * first, reports.val
    saved = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert set(saved) == {k for k, _ in _trainable(result["model"])}
    assert "language_model.model.layers.1.self_attn.q_proj.lora_a" in saved
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["train_projector"] is False
    assert config["lora_parameters"]["keys"] and config["lora_parameters"]["rank"] == 8


def _trainable(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.trainable_parameters())


def test_mask_prompt_covers_exactly_the_answers(tmp_path):
    model, processor = lora.load_for_training(MODEL)
    tok = processor.tokenizer
    messages = [
        {"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": [{"type": "image", "image": str(PHOTO2)}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "blue"},
    ]
    ids, labels, images = tokenize(messages, processor, mask_prompt=True)
    assert images == [str(PHOTO), str(PHOTO2)]
    im_end = tok.convert_tokens_to_ids(IM_END)
    first = tok.encode("a red square", add_special_tokens=False) + [im_end]
    second = tok.encode("blue", add_special_tokens=False) + [im_end]
    # the first answer follows exactly the prompt Engine.prepare makes for the first question
    prompt1 = processor.encode(processor.render(messages[:1])[0])
    assert ids[: len(prompt1)] == prompt1
    assert ids[len(prompt1) : len(prompt1) + len(first)] == first
    assert ids[-len(second) :] == second
    expected = [False] * len(ids)
    for start, answer in ((len(prompt1), first), (len(ids) - len(second), second)):
        expected[start : start + len(answer)] = [True] * len(answer)
    assert labels == expected
    assert ids.count(IMAGE_PLACEHOLDER) == 2
    _, unmasked, _ = tokenize(messages, processor, mask_prompt=False)
    assert unmasked == [t != IMAGE_PLACEHOLDER for t in ids]


def test_batch_splice_matches_embed_prompt(tmp_path):
    model, processor = lora.load_for_training(MODEL)
    make_data(tmp_path / "data", n=2)
    from fastvlm_mlx.tuning.data import read_split

    examples, problems = read_split(tmp_path / "data" / "train.jsonl", processor, model.config.num_image_tokens)
    examples[1].ids = examples[1].ids + [examples[1].ids[-1]] * 3  # a longer second example: padding in the first
    examples[1].labels = examples[1].labels + [True] * 3
    assert not problems
    store = FeatureStore(model, processor, "projected", 1 << 20)
    ids, labels, slots, images = Batches(store, model.config.num_image_tokens).batch(examples)
    spliced = splice(model, ids, slots, images)
    for b, example in enumerate(examples):
        expected = model.embed_prompt(example.ids, images[b : b + 1])
        np.testing.assert_array_equal(np.array(spliced[b, : expected.shape[0]]), np.array(expected))


def test_bad_lines_stop_before_training(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    train = data / "train.jsonl"
    good = train.read_text().splitlines()
    too_long = openai_line("a.png", "word " * 400)
    lines = [good[0], "{not json", json.dumps(openai_line("missing.png", "x")), json.dumps(too_long)] + good[1:]
    train.write_text("\n".join(lines) + "\n")
    argv = ["--model", MODEL, "--data", str(data), "--train", "--num-layers", "-1", "--iters", "1"]
    argv += ["--adapter-path", str(tmp_path / "adapters"), "--max-seq-length", "200", "--batch-size", "2"]
    with pytest.raises(SystemExit) as stopped:
        lora.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert f"{train}:2: not valid JSON" in err
    assert f"{train}:3: image not found: {data / 'imgs' / 'missing.png'}" in err
    assert f"{train}:4: the example is" in err and "over --max-seq-length 200" in err
    assert "error: 3 bad line(s)" in err
    assert not (tmp_path / "adapters" / "adapters.safetensors").exists()  # stopped before training

    with pytest.raises(SystemExit) as finished:
        lora.main(argv + ["--skip-bad-lines"])
    assert finished.value.code == 0
    err = capsys.readouterr().err
    for line in (2, 3, 4):
        assert f"skipped {train}:{line}: " in err
    assert (tmp_path / "adapters" / "adapters.safetensors").exists()


def test_resume_continues_from_the_last_save(tmp_path):
    make_data(tmp_path / "data")
    killed = Reports(stop_after=4)
    with pytest.raises(KeyboardInterrupt):  # saved after step 3, killed after step 4
        run(tmp_path, killed, iters=8, save_every=3, steps_per_eval=4, val_batches=-1)
    saved = tmp_path / "adapters" / "0000003_adapters.safetensors"
    assert saved.exists() and not (tmp_path / "adapters" / "0000006_adapters.safetensors").exists()
    base_loss = dict(killed.val)[0]
    loss_at_save = dict(killed.val)[3]  # validated before update 4: the weights saved after update 3
    assert loss_at_save < 0.9 * base_loss

    resumed = Reports()
    run(tmp_path, resumed, iters=2, val_batches=-1, resume_adapter_file=str(saved), adapter_path=str(tmp_path / "b"))
    assert resumed.val[0][0] == 0
    assert resumed.val[0][1] == pytest.approx(loss_at_save, rel=1e-5)

    with pytest.raises(Exception, match="does not match this run's trainable parameters"):
        run(tmp_path, iters=1, resume_adapter_file=str(saved), fine_tune_type="dora", adapter_path=str(tmp_path / "c"))


@pytest.fixture
def tower_images(monkeypatch):
    """How many images the vision tower has encoded."""
    count = {"images": 0}
    call = FastViTHD.__call__

    def counted(self, pixels):
        count["images"] += pixels.shape[0]
        return call(self, pixels)

    monkeypatch.setattr(FastViTHD, "__call__", counted)
    return count


def test_feature_cache_encodes_each_image_once(tmp_path, tower_images):
    make_data(tmp_path / "data")
    cached = Reports()
    result = run(tmp_path, cached, iters=6, steps_per_eval=3, save_features=True)
    assert tower_images["images"] == 2  # two distinct images, over 6 steps and 3 validations of 8 examples
    assert (tmp_path / "adapters" / "image_features.safetensors").exists()
    assert result["features"].cache.misses >= 2

    tower_images["images"] = 0
    uncached = Reports()
    run(tmp_path, uncached, iters=6, steps_per_eval=3, feature_cache_size=0, adapter_path=str(tmp_path / "none"))
    # batches pair examples of one image (sorted by length): one encode per batch, 6 steps + 3 validations of 4
    assert tower_images["images"] == 6 + 3 * 4
    np.testing.assert_allclose([v for _, v in uncached.val], [v for _, v in cached.val], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in uncached.train], [v for _, v in cached.train], rtol=1e-6)

    tower_images["images"] = 0  # a later run in the same adapter folder reads the saved features
    again = Reports()
    run(tmp_path, again, iters=6, steps_per_eval=3)
    assert tower_images["images"] == 0
    np.testing.assert_allclose([v for _, v in again.val], [v for _, v in cached.val], rtol=1e-6)


def test_trained_projector_caches_the_raw_tower_output(tmp_path, tower_images):
    make_data(tmp_path / "data")
    result = run(tmp_path, iters=2, train_projector=True)
    assert tower_images["images"] == 2
    store = result["features"]
    assert store.kind == "raw"
    assert {e.shape[-1] for e in store.cache._entries.values()} == {result["model"].config.mm_hidden_size}
    saved = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert "projector.linear_1.weight" in saved and "projector.linear_2.bias" in saved


@pytest.mark.parametrize(
    "given,key",
    [
        ({"fine_tune_type": "full", "num_layers": 1}, "language_model.model.layers.1.mlp.up_proj.weight"),
        ({"fine_tune_type": "dora"}, "language_model.model.layers.0.self_attn.q_proj.m"),
        ({"quantize": True}, "language_model.model.layers.0.mlp.down_proj.lora_b"),
        ({"train_vision": True}, "vision_tower.stem.layers.0.bias"),
    ],
)
def test_each_kind_of_tuning_takes_a_step(tmp_path, given, key, tower_images):
    make_data(tmp_path / "data", n=2)
    reports = Reports()
    run(tmp_path, reports, iters=1, **given)
    assert np.isfinite(reports.train[0][1])
    saved = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert key in saved
    if given.get("fine_tune_type") == "full":
        assert not any(k.startswith("language_model.model.layers.0.") for k in saved)  # only the last layer
    if given.get("train_vision"):
        assert tower_images["images"] >= 4  # the tower runs in every loss: no cache


def test_loss_is_the_masked_mean_cross_entropy(tmp_path):
    """The loss against a direct computation: the whole sequence's logits through the model's own embed_prompt,
    log-softmax in numpy, averaged over the answer tokens."""
    model, processor = lora.load_for_training(MODEL)
    make_data(tmp_path / "data", n=2)
    from fastvlm_mlx.tuning.data import read_split

    examples, _ = read_split(tmp_path / "data" / "train.jsonl", processor, model.config.num_image_tokens)
    store = FeatureStore(model, processor, "projected", 1 << 20)
    batch = Batches(store, model.config.num_image_tokens).batch(examples)
    loss, tokens = make_loss("projected")(model, *batch)
    total, count = 0.0, 0
    for b, example in enumerate(examples):
        embeds = model.embed_prompt(example.ids, batch[3][b : b + 1])
        logits = np.array(model(mx.array([0]), input_embeddings=embeds[None])[0], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        logp -= logits.max(-1, keepdims=True)
        targets = [t for t in example.ids]
        at, positions = 0, []
        for t, label in zip(targets, example.labels):
            positions.append((at, t, label))
            at += model.config.num_image_tokens if t == IMAGE_PLACEHOLDER else 1
        for at, t, label in positions:
            if label:
                total -= logp[at - 1, t]
                count += 1
    assert int(tokens.item()) == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_qlora_on_a_4bit_model_directory_trains_and_its_adapters_load_everywhere(tmp_path):
    """QLoRA: LoRA trained over an mlx-community style 4-bit directory lowers the validation loss, and the
    adapters load in the API and in the generate command (which give the same answer)."""
    from conftest import run_cli

    from fastvlm_mlx import generate, load

    base = str(FIXTURES / "format_c_4bit")
    make_data(tmp_path / "data")
    reports = Reports()
    result = run(tmp_path, reports, model=base, iters=12, steps_per_eval=12)
    assert reports.val[-1][1] < reports.val[0][1], reports.val
    assert "QuantizedLinear" in type(result["model"].language_model.model.layers[0].mlp.down_proj.linear).__name__
    adapters = str(tmp_path / "adapters")
    model, processor = load(base, adapter_path=adapters)
    tuned = generate(model, processor, "What is it?", image=str(PHOTO), max_tokens=8)
    assert tuned != generate(*load(base), "What is it?", image=str(PHOTO), max_tokens=8)
    proc = run_cli(
        "fastvlm_mlx.generate", "-m", base, "--adapter-path", adapters, "-i", str(PHOTO), "-p", "What is it?",
        "--max-tokens", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tuned + "\n"
