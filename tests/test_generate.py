"""The generate CLI and Python API driven as a user would, on the committed fixtures.

Device and dtype: the process default (``precision.DTYPE``).  In float32 every answer is transformers' greedy answer;
in half precision the API's tokens are transformers' over the steps their margins decide, and the CLI prints
the API's answer."""

import io

import pytest
from conftest import FIXTURES, PHOTO, assert_clean_error, run_cli
from precision import EXACT_TOKENS, LOGITS_TOL, assert_same_greedy_tokens

from fastvlm_mlx import FastVLMError, generate, load, stream_generate

MODEL = str(FIXTURES / "format_a")


@pytest.fixture(scope="module")
def model_and_processor():
    return load(MODEL)


def expected_text(processor, tokens, prompt="Describe the image.", image=PHOTO, model=None):
    """The reference's greedy answer; in half precision, where its later steps are not decided (see
    ``precision.EXACT_TOKENS``), the API's own greedy answer to the same request."""
    if EXACT_TOKENS:
        return processor.tokenizer.decode(list(tokens))
    model = model or load(MODEL)[0]
    return "".join(r.text for r in stream_generate(model, processor, prompt, image=image, max_tokens=len(tokens)))


def test_cli_answers_with_reference_greedy_tokens(reference, model_and_processor):
    arrays, meta = reference
    _, processor = model_and_processor
    n = len(arrays["greedy_tokens"])
    proc = run_cli(
        "fastvlm_mlx.generate",
        "--model",
        MODEL,
        "--image",
        str(PHOTO),
        "--prompt",
        "Describe the image.",
        "--max-tokens",
        str(n),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(processor, arrays["greedy_tokens"].tolist()) + "\n"
    assert proc.stderr == ""


def test_cli_text_only(reference, model_and_processor):
    arrays, _ = reference
    _, processor = model_and_processor
    n = len(arrays["text_only_greedy"])
    proc = run_cli("fastvlm_mlx.generate", "--model", MODEL, "--prompt", "Hello there.", "--max-tokens", str(n))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(processor, arrays["text_only_greedy"].tolist(), "Hello there.", None) + "\n"


def test_cli_verbose_stats(reference):
    proc = run_cli(
        "fastvlm_mlx.generate",
        "-m",
        MODEL,
        "-i",
        str(PHOTO),
        "-p",
        "Describe the image.",
        "--max-tokens",
        "5",
        "--verbose",
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    for field in ("vision", "TTFT", "prompt 72 tokens", "generation 5 tokens", "peak memory"):
        assert field in line, line
    vision = float(line.split("vision ")[1].split(" ms")[0])
    ttft = float(line.split("TTFT ")[1].split(" ms")[0])
    assert 0 < vision <= ttft


@pytest.mark.parametrize("model_dir", ["format_b", "format_c"])
def test_cli_other_formats_give_same_answer(model_dir, reference, model_and_processor):
    arrays, _ = reference
    _, processor = model_and_processor
    proc = run_cli(
        "fastvlm_mlx.generate",
        "-m",
        str(FIXTURES / model_dir),
        "-i",
        str(PHOTO),
        "-p",
        "Describe the image.",
        "--max-tokens",
        "16",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(processor, arrays["greedy_tokens"].tolist()) + "\n"


def test_api_stream_matches_reference(reference, model_and_processor):
    arrays, _ = reference
    model, processor = model_and_processor
    responses = list(stream_generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=16))
    noise = LOGITS_TOL * abs(arrays["logits_first"]).max().item()  # how far our logits may be from transformers'
    assert_same_greedy_tokens(
        [r.token for r in responses], arrays["greedy_tokens"].tolist(), [r.logprobs for r in responses], noise
    )
    last = responses[-1]
    assert last.prompt_tokens == 72  # image positions included
    assert last.generation_tokens == 16 and last.finish_reason == "length"
    assert 0 < last.vision_ms <= last.ttft_ms and last.peak_memory > 0
    assert last.logprobs.shape == (448,)


def test_api_generate_returns_text(model_and_processor, reference):
    arrays, _ = reference
    model, processor = model_and_processor
    text = generate(model, processor, "Describe the image.", image=str(PHOTO), max_tokens=16)
    assert text == expected_text(processor, arrays["greedy_tokens"].tolist())


def test_api_stops_at_im_end(model_and_processor):
    """<|im_end|> ends generation (Apple's template closes every turn with it)."""
    from mlx_lm.sample_utils import make_logits_processors

    model, processor = model_and_processor
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in processor.tokenizer.eos_token_ids
    force_im_end = make_logits_processors(logit_bias={im_end: 1e4})  # forces it in every dtype (float16's max 65504)
    responses = list(stream_generate(model, processor, "Hi", max_tokens=10, logits_processors=force_im_end))
    assert len(responses) == 1 and responses[0].finish_reason == "stop" and responses[0].text == ""


def test_api_sampling_is_seeded(model_and_processor):
    model, processor = model_and_processor
    a = generate(model, processor, "Hello there.", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, processor, "Hello there.", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a == b


def test_library_prints_nothing(model_and_processor, capsys):
    model, processor = model_and_processor
    generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=3)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_api_errors(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(FastVLMError, match="empty"):
        generate(model, processor, "   ")
    with pytest.raises(FastVLMError, match="context"):
        generate(model, processor, "word " * 600, image=PHOTO)


# ---- bad input through the CLI: one line, non-zero exit, no traceback ----


def cli(*args):
    return run_cli("fastvlm_mlx.generate", "--model", MODEL, "--max-tokens", "2", *args)


def test_missing_image(tmp_path):
    assert_clean_error(cli("--image", str(tmp_path / "nope.jpg"), "--prompt", "hi"), "nope.jpg")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"\x00\x01 definitely not a jpeg " * 20)
    assert_clean_error(cli("--image", str(path), "--prompt", "hi"), "notes.jpg")


def test_truncated_jpeg(tmp_path):
    from PIL import Image

    path = tmp_path / "cut.jpg"
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert_clean_error(cli("--image", str(path), "--prompt", "hi"), "cut.jpg", "truncated")


def test_decompression_bomb(tmp_path):
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(path)  # 225 Mpixel, a few kB on disk
    assert_clean_error(cli("--image", str(path), "--prompt", "hi"), "bomb.png")


def test_empty_prompt():
    assert_clean_error(cli("--prompt", ""), "empty")


def test_prompt_over_context():
    assert_clean_error(cli("--prompt", "word " * 600), "context")


def test_unknown_model_path(tmp_path):
    proc = run_cli("fastvlm_mlx.generate", "--model", str(tmp_path / "missing-model"), "--prompt", "hi")
    assert_clean_error(proc, "missing-model")


def test_offline_default_model_says_how_to_fix():
    proc = run_cli(
        "fastvlm_mlx.generate", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    )
    assert_clean_error(proc, "apple/FastVLM-0.5B", "local model directory")


def test_model_dir_missing_files(fixture_copy):
    path = fixture_copy("format_b")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    proc = run_cli("fastvlm_mlx.generate", "--model", str(path), "--prompt", "hi")
    assert_clean_error(proc, "tokenizer")
    path = fixture_copy("format_c")
    (path / "model.safetensors").unlink()
    proc = run_cli("fastvlm_mlx.generate", "--model", str(path), "--prompt", "hi")
    assert_clean_error(proc, "safetensors")


def test_bad_option_value():
    proc = cli("--prompt", "hi", "--max-tokens", "many")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "max-tokens" in proc.stderr


def test_the_api_function_survives_an_import_of_the_command_module():
    """``import fastvlm_mlx.generate`` (the console script does it) rebinds the package's ``generate``."""
    import importlib

    import fastvlm_mlx
    from fastvlm_mlx.engine import generate as engine_generate

    importlib.import_module("fastvlm_mlx.generate")
    model, processor = load(MODEL)
    answer = fastvlm_mlx.generate(model, processor, "Describe.", image=str(PHOTO), max_tokens=4)
    assert answer == engine_generate(model, processor, "Describe.", image=str(PHOTO), max_tokens=4)
