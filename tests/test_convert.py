"""Conversion to the MLX format (round trip, dtypes, quantization) and every way a checkpoint can be bad."""

import json

import mlx.core as mx
import pytest
from conftest import FIXTURES, assert_clean_error, rel_err, run_cli
from precision import EMBEDS_TOL, LOGITS_TOL, VISION_TOL

from fastvlm_convert import convert_checkpoint
from fastvlm_mlx import FastVLMError, load
from fastvlm_mlx.checkpoints import read_weights


def logits_for(model, processor, meta, arrays):
    ids = processor.encode(meta["prompt_text"])
    embeddings = model.embed_prompt(ids, model.encode_image(arrays["pixels"]))
    return model(mx.array([[0] * embeddings.shape[0]]), input_embeddings=embeddings[None])[0, -1]


@pytest.mark.parametrize("source", ["format_a", "format_b", "format_c"])
def test_round_trip_float32(source, tmp_path, reference):
    arrays, meta = reference
    dst = tmp_path / "mlx"
    convert_checkpoint(FIXTURES / source, dst, dtype="float32")
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "fastvlm_mlx" and config["source_format"]
    assert (dst / "tokenizer.json").is_file()
    weights = read_weights(dst)
    assert not any(".bn." in k for k in weights), "BatchNorm must be folded"
    assert weights["vision_tower.stages.0.blocks.0.mlp.fc1.weight"].ndim == 2, "1x1 convs stored as matrices"
    model, processor = load(str(dst))
    # loaded in the process's default dtype (precision.DTYPE), whose tolerances apply
    assert rel_err(model.vision_tower(arrays["pixels"]).reshape(1, 16, -1), arrays["vision_features"]) <= VISION_TOL
    vocab = 448
    assert rel_err(logits_for(model, processor, meta, arrays)[:vocab], arrays["logits_first"][:vocab]) <= LOGITS_TOL


def test_float16_conversion_is_close(tmp_path, reference):
    arrays, meta = reference
    dst = tmp_path / "fp16"
    convert_checkpoint(FIXTURES / "format_a", dst, dtype="float16")
    assert read_weights(dst)["vision_tower.stem.layers.0.weight"].dtype == mx.float16
    model, processor = load(str(dst))  # upcast to float32 on CPU
    assert rel_err(logits_for(model, processor, meta, arrays)[:448], arrays["logits_first"][:448]) <= 2e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion(bits, tmp_path, reference):
    arrays, meta = reference
    dst = tmp_path / f"q{bits}"
    convert_checkpoint(FIXTURES / "format_a", dst, dtype="float32", quantize_bits=bits, group_size=32)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
    weights = read_weights(dst)
    assert "language_model.model.layers.0.mlp.up_proj.scales" in weights
    assert not any(k.startswith(("vision_tower.", "projector.")) and k.endswith(".scales") for k in weights)
    model, processor = load(str(dst))
    logits = logits_for(model, processor, meta, arrays)[:448]
    reference_logits = arrays["logits_first"][:448]
    assert mx.all(mx.isfinite(logits)).item()
    cosine = (logits * reference_logits).sum() / mx.sqrt((logits**2).sum() * (reference_logits**2).sum())
    assert cosine.item() >= (0.95 if bits == 4 else 0.999)
    assert mx.argmax(logits).item() == mx.argmax(reference_logits).item()


def test_quantize_projector_option(tmp_path):
    dst = tmp_path / "qp"
    convert_checkpoint(
        FIXTURES / "format_b", dst, dtype="float32", quantize_bits=8, group_size=32, quantize_projector=True
    )
    assert "projector.linear_1.scales" in read_weights(dst)
    load(str(dst))


def test_cli_converts_apple_and_hf(tmp_path, reference):
    for source in ("format_a", "format_b"):
        dst = tmp_path / source
        proc = run_cli(
            "fastvlm_mlx.convert", "--hf-path", str(FIXTURES / source), "--mlx-path", str(dst), "--dtype", "float32"
        )
        assert proc.returncode == 0, proc.stderr
        model, _ = load(str(dst))
        assert rel_err(model.encode_image(reference[0]["pixels"]), reference[0]["image_embeds"]) <= EMBEDS_TOL


def test_cli_refuses_non_empty_destination(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    proc = run_cli("fastvlm_mlx.convert", "--hf-path", str(FIXTURES / "format_a"), "--mlx-path", str(dst))
    assert_clean_error(proc, "not empty", "--force")
    assert (dst / "keep.txt").read_text() == "precious"
    proc = run_cli("fastvlm_mlx.convert", "--hf-path", str(FIXTURES / "format_a"), "--mlx-path", str(dst), "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import fastvlm_convert.writer as writer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.mx, "save_safetensors", interrupted)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(FIXTURES / "format_a", dst)
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_keeps_previous_model(tmp_path, monkeypatch):
    import fastvlm_convert.writer as writer

    dst = tmp_path / "out"
    convert_checkpoint(FIXTURES / "format_a", dst, dtype="float32")
    before = sorted(p.name for p in dst.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(writer.mx, "save_safetensors", disk_full)
    with pytest.raises(OSError):
        convert_checkpoint(FIXTURES / "format_b", dst, force=True)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_partial_directory_is_cleaned(tmp_path):
    stale = tmp_path / ".out.partial-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    convert_checkpoint(FIXTURES / "format_a", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- bad checkpoints: a clear error, never a partial load ----


def test_missing_config(fixture_copy):
    path = fixture_copy("format_a")
    (path / "config.json").unlink()
    with pytest.raises(FastVLMError, match="no config.json"):
        load(str(path))


def test_missing_weights(fixture_copy):
    path = fixture_copy("format_b")
    (path / "model.safetensors").unlink()
    with pytest.raises(FastVLMError, match="no \\*.safetensors"):
        load(str(path))


def test_missing_shard(fixture_copy):
    path = fixture_copy("format_a")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FastVLMError, match="model-00002-of-00002.safetensors"):
        load(str(path))


def test_truncated_safetensors(fixture_copy):
    path = fixture_copy("format_b")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FastVLMError, match="truncated"):
        load(str(path))


def test_garbage_safetensors(fixture_copy):
    path = fixture_copy("format_b")
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(FastVLMError, match="model.safetensors"):
        load(str(path))


def test_unknown_model_type(fixture_copy):
    path = fixture_copy("format_a")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FastVLMError, match="unsupported model_type 'llama'"):
        load(str(path))


def test_config_and_tensors_disagree(fixture_copy):
    path = fixture_copy("format_a")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "fast_vlm"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FastVLMError, match="fast_vlm"):
        load(str(path))


def _add_mystery(w):
    w["model.vision_tower.timm_model.stages.1.blocks.0.mystery.weight"] = mx.zeros((3,))


def _drop_up_proj(w):
    del w["language_model.model.layers.1.mlp.up_proj.weight"]


def _misshape_q_bias(w):
    w["language_model.model.layers.0.self_attn.q_proj.bias"] = mx.zeros((3,))


def _keep_llm_only(w):
    for key in [k for k in w if not k.startswith("language_model.")]:
        del w[key]


@pytest.mark.parametrize(
    "fixture, damage, message",
    [
        ("format_b", _add_mystery, "mystery"),  # unexpected tensor
        ("format_c", _drop_up_proj, "up_proj"),  # missing tensor
        ("format_c", _misshape_q_bias, "q_proj"),  # misshaped tensor
        ("format_c", _keep_llm_only, "mlpackage"),  # Apple's app bundle: LLM only, vision in CoreML
    ],
)
def test_damaged_tensors(fixture_copy, fixture, damage, message):
    path = fixture_copy(fixture)
    weights = mx.load(str(path / "model.safetensors"))
    damage(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(FastVLMError, match=message):
        load(str(path))


def test_cli_bad_source_is_one_line(tmp_path):
    proc = run_cli("fastvlm_mlx.convert", "--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "out"))
    assert_clean_error(proc, "nope")
    (tmp_path / "empty").mkdir()
    proc = run_cli("fastvlm_mlx.convert", "--hf-path", str(tmp_path / "empty"), "--mlx-path", str(tmp_path / "out"))
    assert_clean_error(proc, "config.json")
    assert not (tmp_path / "out").exists()


def test_cli_bad_dtype(tmp_path):
    proc = run_cli(
        "fastvlm_mlx.convert",
        "--hf-path",
        str(FIXTURES / "format_a"),
        "--mlx-path",
        str(tmp_path / "o"),
        "--dtype",
        "int3",
    )
    assert_clean_error(proc, "--dtype")
