"""Preference tuning (``python -m fastvlm_mlx.lora --train-mode dpo``) on the tiny fixture: the DPO loss against
a direct numpy computation, training prefers the chosen answers, bad lines, the adapters load."""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2

from fastvlm_mlx import lora
from fastvlm_mlx.model import IMAGE_PLACEHOLDER
from fastvlm_mlx.tuning import preference
from fastvlm_mlx.tuning.trainer import FeatureStore, make_trainable

MODEL = str(FIXTURES / "format_a")
# one preferred answer for both images: the tiny random fixture barely tells its two images apart, and a DPO
# run of a few steps must show the preference learnt
ANSWERS = {"a.png": ("red square", "blue circle"), "b.png": ("red square", "blue circle")}


def prompt_line(image: str) -> dict:
    chosen, rejected = ANSWERS[image]
    return {"prompt": "<image>\nWhat is it?", "image": f"imgs/{image}", "chosen": chosen, "rejected": rejected}


def messages_line(image: str) -> dict:
    chosen, rejected = ANSWERS[image]
    question = [{"type": "image", "image": f"imgs/{image}"}, {"type": "text", "text": "What is it?"}]
    return {"messages": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}


def make_data(folder, n: int = 8):
    """Preference pairs in both line styles; images in folder/imgs."""
    (folder / "imgs").mkdir(parents=True)
    shutil.copy(PHOTO, folder / "imgs" / "a.png")
    shutil.copy(PHOTO2, folder / "imgs" / "b.png")
    rows = [(prompt_line if i % 4 < 2 else messages_line)(["a.png", "b.png"][i % 2]) for i in range(n)]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


class Reports:
    def __init__(self):
        self.val, self.train = [], []

    def on_val_loss_report(self, info):
        self.val.append((info["iteration"], info["val_loss"]))

    def on_train_loss_report(self, info):
        self.train.append((info["iteration"], info["train_loss"]))


def tune(tmp_path, callback=None, **given):
    given = {
        "model": MODEL,
        "data": str(tmp_path / "data"),
        "train": True,
        "train_mode": "dpo",
        "num_layers": -1,
        "batch_size": 2,
        "iters": 1,
        "learning_rate": 1e-3,
        "steps_per_report": 1,
        "val_batches": -1,
        "adapter_path": str(tmp_path / "adapters"),
        **given,
    }
    return lora.tune(lora.options(given), training_callback=callback, report=lambda line: None)


def direct_logp(model, example, features) -> float:
    """Summed log-probability of the labelled tokens: one sequence through embed_prompt, log-softmax in numpy."""
    embeds = model.embed_prompt(example.ids, features)
    logits = np.array(model(mx.array([0]), input_embeddings=embeds[None])[0], dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    total, at = 0.0, 0
    for token, label in zip(example.ids, example.labels):
        if label:
            total += logp[at - 1, token]
        at += model.config.num_image_tokens if token == IMAGE_PLACEHOLDER else 1
    return total


def test_dpo_loss_matches_a_direct_computation(tmp_path):
    """(b) with non-zero B, and (a) log(2) while the policy is the reference."""
    make_data(tmp_path / "data", n=4)
    model, processor = lora.load_for_training(MODEL)
    n = model.config.num_image_tokens
    pairs, problems = preference.read_preference_split(tmp_path / "data" / "train.jsonl", processor, n)
    assert not problems and len(pairs) == 4
    mx.random.seed(0)
    make_trainable(model, "lora", -1, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]})
    store = FeatureStore(model, processor, "projected", 1 << 20)
    batches = preference.PreferenceBatches(store, n)
    preference.set_references(model, pairs, batches, 2, "projected")
    loss = preference.make_dpo_loss("projected", 0.5)
    for group in preference.groups(pairs, 2, n):
        value, count = loss(model, *batches.batch(group))
        assert abs(value.item() - math.log(2)) < 1e-6 and count.item() == 2

    features = {id(p): store(p.chosen.images) for p in pairs}
    base = {id(p): [direct_logp(model, e, features[id(p)]) for e in (p.chosen, p.rejected)] for p in pairs}
    for p in pairs:  # the precomputed reference is the base model's
        np.testing.assert_allclose(p.reference, base[id(p)], rtol=1e-5)
    for layer in model.language_model.layers:
        q = layer.self_attn.q_proj
        q.lora_b = 0.05 * mx.random.normal(q.lora_b.shape)
    for group in preference.groups(pairs, 2, n):
        value, _ = loss(model, *batches.batch(group))
        expected = []
        for p in group:
            chosen, rejected = (direct_logp(model, e, features[id(p)]) for e in (p.chosen, p.rejected))
            margin = 0.5 * ((chosen - base[id(p)][0]) - (rejected - base[id(p)][1]))
            assert abs(margin) > 1e-3  # the adapters changed the model
            expected.append(-np.log(1 / (1 + np.exp(-margin))))
        assert value.item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_answer_mask_covers_the_last_answer_only(tmp_path):
    make_data(tmp_path / "data", n=2)
    _, processor = lora.load_for_training(MODEL)
    line = messages_line("a.png")
    line["messages"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        *line["messages"],
    ]
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(line) + "\n")
    (pair,), _ = preference.read_preference_split(tmp_path / "data" / "train.jsonl", processor, 4)
    tok = processor.tokenizer
    for example, answer in ((pair.chosen, "red square"), (pair.rejected, "blue circle")):
        covered = [t for t, label in zip(example.ids, example.labels) if label]
        assert covered == tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert example.images == [str(tmp_path / "data" / "imgs" / "a.png")]


def test_training_prefers_the_chosen_answers_and_the_adapters_load(tmp_path):
    """(a) log(2) before the first update, (c) the validation DPO loss falls and the chosen answers gain,
    (e) the saved adapters load with fastvlm_mlx.load."""
    make_data(tmp_path / "data")
    reports = Reports()
    result = tune(tmp_path, reports, iters=4, steps_per_eval=4, beta=0.5, test=True, learning_rate=1e-4)
    assert reports.val[0][0] == 0 and abs(reports.val[0][1] - math.log(2)) < 1e-6
    assert reports.val[-1][1] < math.log(2) - 0.05, reports.val
    assert result["valid_reward_accuracy"] == 1.0 and result["test_reward_accuracy"] == 1.0
    model, kind = result["model"], result["features"].kind
    batches = preference.PreferenceBatches(result["features"], model.config.num_image_tokens)
    for group in preference.groups(result["splits"]["train"], 2, model.config.num_image_tokens):
        margins = preference.dpo_margins(model, *batches.batch(group), kind, 1.0)
        assert (np.array(margins) > 0).all()  # P(chosen) / P(rejected) rose above the base model's ratio

    import fastvlm_mlx

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["train_mode"] == "dpo" and config["beta"] == 0.5
    loaded, _ = fastvlm_mlx.load(MODEL, adapter_path=str(tmp_path / "adapters"))
    base, _ = fastvlm_mlx.load(MODEL)
    ids = result["splits"]["valid"][0].chosen.ids
    text = mx.array([ids[: ids.index(IMAGE_PLACEHOLDER)]])  # the system prompt before the image
    model.eval()
    tuned = np.array(model(text))
    np.testing.assert_allclose(np.array(loaded(text)), tuned, rtol=1e-4, atol=1e-4)
    assert np.abs(np.array(base(text)) - tuned).max() > 1e-3  # the adapters made a difference


def test_bad_lines_stop_before_training(tmp_path, capsys):
    data = make_data(tmp_path / "data", n=4)
    train = data / "train.jsonl"
    good = train.read_text().splitlines()
    no_rejected = {k: v for k, v in prompt_line("a.png").items() if k != "rejected"}
    empty_chosen = {**prompt_line("a.png"), "chosen": ""}
    missing_image = {**prompt_line("a.png"), "image": "imgs/missing.png"}
    no_prompt = {k: v for k, v in prompt_line("a.png").items() if k != "prompt"}
    bad = [no_rejected, empty_chosen, missing_image, no_prompt]
    train.write_text("\n".join([good[0]] + [json.dumps(b) for b in bad] + good[1:]) + "\n")
    argv = ["--model", MODEL, "--data", str(data), "--train", "--train-mode", "dpo", "--iters", "1"]
    argv += ["--adapter-path", str(tmp_path / "adapters"), "--batch-size", "2", "--num-layers", "-1"]
    with pytest.raises(SystemExit) as stopped:
        lora.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert f"{train}:2: 'rejected' must be a non-empty string" in err
    assert f"{train}:3: 'chosen' must be a non-empty string" in err
    assert f"{train}:4: image not found: {data / 'imgs' / 'missing.png'}" in err
    assert f"{train}:5: a preference line needs 'prompt' or 'messages'" in err
    assert "error: 4 bad line(s)" in err
    assert not (tmp_path / "adapters" / "adapters.safetensors").exists()

    with pytest.raises(SystemExit) as finished:
        lora.main(argv + ["--skip-bad-lines"])
    assert finished.value.code == 0
    err = capsys.readouterr().err
    assert all(f"skipped {train}:{line}: " in err for line in (2, 3, 4, 5))
    assert "Valid reward accuracy" in err and (tmp_path / "adapters" / "adapters.safetensors").exists()

    with pytest.raises(SystemExit) as refused:
        lora.main(argv + ["--beta", "0"])
    assert refused.value.code == 1 and "--beta must be above 0" in capsys.readouterr().err
