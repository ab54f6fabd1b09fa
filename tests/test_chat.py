"""Conversations: messages, several images, ChatSession with KV reuse and save/load, the image-feature
cache and the chat CLI.  References for rendered conversations come from transformers (make_fixtures.py).

Device and dtype: the process default (``precision.DTYPE``), with its tolerances against the references; a cached
turn and a cold run compute the same numbers in any dtype, so those comparisons keep float32's tolerance."""

import shutil

import mlx.core as mx
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, assert_clean_error, rel_err, run_cli
from precision import (
    DTYPE,
    EXACT_TOKENS,
    LOGITS_TOL,
    VISION_LAYERS,
    assert_same_greedy_tokens,
    tolerance,
)

from fastvlm_mlx import ChatSession, FastVLMError, generate, load, stream_generate
from fastvlm_mlx.engine import Engine, ImageFeatureCache, engine_for
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.processor import one_turn, render_messages

MODEL = str(FIXTURES / "format_a")
TOL = 1e-4


@pytest.fixture(scope="module")
def model_and_processor():
    return load(MODEL)


def with_images(messages, images):
    """The fixture's conversations name images by {"type": "image"}; give them files, in order."""
    images = iter(images)
    out = []
    for m in messages:
        parts = [dict(p, image=next(images)) if p["type"] == "image" else p for p in m["content"]]
        out.append(dict(m, content=parts))
    return out


def log_softmax(logits):
    return logits - mx.logsumexp(logits, keepdims=True)


def first_logprobs(model, processor, messages, **kwargs):
    responses = list(stream_generate(model, processor, messages=messages, **kwargs))
    return responses, responses[0].logprobs


# ------------------------------------------------------------------------------- messages
def test_rendering_matches_transformers_chat_template(reference):
    _, meta = reference
    text, images = render_messages(with_images(meta["conversation"], [PHOTO]))
    assert text == meta["conv_prompt_text"] and images == [PHOTO]
    text, images = render_messages(with_images(meta["two_images"], [PHOTO, PHOTO2]))
    assert text == meta["two_images_prompt_text"] and images == [PHOTO, PHOTO2]
    assert render_messages(one_turn("Describe the image.", PHOTO))[0] == meta["prompt_text"]  # as before


@pytest.mark.parametrize("name,images", [("conv", [PHOTO]), ("two_images", [PHOTO, PHOTO2])])
def test_conversations_match_transformers(name, images, reference, model_and_processor):
    arrays, meta = reference
    model, processor = model_and_processor
    messages = with_images(meta["conversation" if name == "conv" else "two_images"], images)
    expected = arrays[f"{name}_greedy_tokens"].tolist()  # the reference loop runs past <|im_end|>; we stop there
    eos = [i for i, t in enumerate(expected) if t in processor.tokenizer.eos_token_ids]
    expected = expected[: eos[0] + 1] if eos else expected
    responses, logprobs = first_logprobs(model, processor, messages, max_tokens=len(arrays[f"{name}_greedy_tokens"]))
    ref = log_softmax(arrays[f"{name}_logits_first"])
    assert rel_err(logprobs, ref[: logprobs.shape[0]]) <= LOGITS_TOL
    noise = LOGITS_TOL * mx.abs(ref).max().item()  # how far our log-probabilities may be from transformers'
    assert_same_greedy_tokens([r.token for r in responses], expected, [r.logprobs for r in responses], noise)
    assert responses[-1].prompt_tokens == len(arrays[f"{name}_ids_hf"])  # every image position counted


def test_each_image_is_spliced_at_its_own_place(reference, model_and_processor):
    _, meta = reference
    model, processor = model_and_processor
    engine = Engine(model, processor)
    prompt = engine.prepare(with_images(meta["two_images"], [PHOTO2, PHOTO]))
    embeddings = engine.embed(prompt)
    spans = prompt.image_spans()
    assert len(spans) == 2 and len(embeddings) == len(prompt)
    # both images in one tower call against each alone: the same maths, summed in another order, which in half
    # precision may turn a rounding at any layer
    tol = tolerance(1e-6, VISION_LAYERS + 2)  # through the tower and the projector
    for span, path in zip(spans, [PHOTO2, PHOTO]):
        expected = model.encode_image(processor.preprocess(path))[0]
        assert rel_err(embeddings[span.start : span.stop], expected) <= tol


def test_message_errors(model_and_processor):
    model, processor = model_and_processor
    bad = [
        ([], "non-empty"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "video"}]}], "part type"),
        ([{"role": "user", "content": "an <image> here"}], "<image>"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
        ([{"role": "user", "content": [{"type": "image", "image": str(FIXTURES / "nope.png")}]}], "no such file"),
        (
            [{"role": "user", "content": [{"type": "image", "image": PHOTO}] * 32 + [{"type": "text", "text": "hi"}]}],
            "context",
        ),
    ]
    for messages, words in bad:
        with pytest.raises(FastVLMError, match=words):
            generate(model, processor, messages=messages, max_tokens=2)
    with pytest.raises(FastVLMError, match="either"):
        generate(model, processor, "hi", messages=[{"role": "user", "content": "hi"}])


def test_generate_cli_takes_several_images(reference, model_and_processor):
    arrays, meta = reference
    model, processor = model_and_processor
    proc = run_cli(
        "fastvlm_mlx.generate",
        "-m",
        MODEL,
        "-i",
        str(PHOTO),
        "-i",
        str(PHOTO2),
        "-p",
        "Compare the two images.",
        "--max-tokens",
        "16",
    )
    assert proc.returncode == 0, proc.stderr
    tokens = arrays["two_images_greedy_tokens"].tolist()
    tokens = (
        tokens[: tokens.index(processor.tokenizer.eos_token_id)]
        if processor.tokenizer.eos_token_id in tokens
        else tokens
    )
    expected = processor.tokenizer.decode(tokens)
    if not EXACT_TOKENS:  # half precision: the API's answer, which test_conversations_match_transformers checks
        expected = generate(model, processor, "Compare the two images.", image=[PHOTO, PHOTO2], max_tokens=16)
    assert proc.stdout == expected + "\n"


# ---------------------------------------------------------------------------- ChatSession
def test_follow_up_reuses_the_cache_and_equals_a_cold_run(model_and_processor):
    model, processor = model_and_processor
    chat = ChatSession(model, processor)
    first = list(chat.stream("Describe the image.", [PHOTO], max_tokens=6))  # max_tokens reached mid-answer
    assert first[-1].cached_tokens == 0 and first[-1].finish_reason == "length"
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    held = len(chat.cache.positions)
    second = list(chat.stream("What colour is the ball?", max_tokens=6))
    assert second[0].cached_tokens > 0 and second[0].cached_tokens <= held
    assert second[0].vision_ms < 50  # the image is inside the cached prefix: not encoded
    cold = list(stream_generate(model, processor, messages=chat.messages[:-1], system=None, max_tokens=6))
    assert [r.token for r in second] == [r.token for r in cold]
    assert rel_err(second[0].logprobs, cold[0].logprobs) <= TOL
    assert second[0].prompt_tokens == cold[0].prompt_tokens
    assert len(chat.messages) == 5


def test_stopping_early_then_continuing_stays_correct(model_and_processor):
    model, processor = model_and_processor
    chat = ChatSession(model, processor)
    stream = chat.stream("Describe the image.", [PHOTO], max_tokens=20)
    next(stream), next(stream)
    stream.close()  # the caller stopped after two tokens
    assert chat.messages[-1]["role"] == "assistant"
    nxt = list(chat.stream("And the box?", max_tokens=5))
    cold = list(stream_generate(model, processor, messages=chat.messages[:-1], system=None, max_tokens=5))
    assert [r.token for r in nxt] == [r.token for r in cold]
    assert rel_err(nxt[0].logprobs, cold[0].logprobs) <= TOL
    # editing the history is safe too: the cache is trimmed to what still matches
    chat.messages = chat.messages[:3]
    edited = list(chat.stream("Something else?", max_tokens=4))
    cold = list(stream_generate(model, processor, messages=chat.messages[:-1], system=None, max_tokens=4))
    assert [r.token for r in edited] == [r.token for r in cold]


def test_changed_image_at_the_same_path_is_not_reused(tmp_path, model_and_processor):
    model, processor = model_and_processor
    path = tmp_path / "picture.png"
    shutil.copy(PHOTO, path)
    chat = ChatSession(model, processor)
    chat.ask("Describe the image.", [path], max_tokens=4)
    shutil.copy(PHOTO2, path)  # same path, new pixels
    responses = list(chat.stream("Describe it again.", max_tokens=4))
    image_start = processor.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert responses[0].cached_tokens == len(image_start)  # reuse stops where the image begins
    cold = list(stream_generate(model, processor, messages=chat.messages[:-1], system=None, max_tokens=4))
    assert [r.token for r in responses] == [r.token for r in cold]
    assert rel_err(responses[0].logprobs, cold[0].logprobs) <= TOL


def test_bad_turn_leaves_history_intact(model_and_processor):
    model, processor = model_and_processor
    chat = ChatSession(model, processor)
    chat.ask("Hello there.", max_tokens=3)
    before = list(chat.messages)
    with pytest.raises(FastVLMError, match="no such file"):
        chat.ask("Look.", [FIXTURES / "missing.png"], max_tokens=3)
    with pytest.raises(FastVLMError, match="empty"):
        chat.ask("  ", max_tokens=3)
    assert chat.messages == before
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "You are a helpful assistant."}]


def test_save_and_load_resume_without_prefill(tmp_path, model_and_processor):
    model, processor = model_and_processor
    chat = ChatSession(model, processor)
    chat.ask("Describe the image.", [PHOTO], max_tokens=4)
    chat.ask("Compare.", [PHOTO2.read_bytes()], max_tokens=4)  # an image given as bytes travels inside the file
    chat.save(tmp_path / "conversation.safetensors")
    resumed = ChatSession.load(tmp_path / "conversation.safetensors", model, processor)
    assert [m["role"] for m in resumed.messages] == [m["role"] for m in chat.messages]
    held = len(chat.cache.positions)
    a = list(chat.stream("And now?", max_tokens=5))
    b = list(resumed.stream("And now?", max_tokens=5))
    assert b[0].cached_tokens == a[0].cached_tokens and b[0].cached_tokens > 0.9 * held  # no prefill again
    assert [r.token for r in a] == [r.token for r in b]
    assert rel_err(a[0].logprobs, b[0].logprobs) <= 1e-6


def test_load_refuses_other_models_and_other_files(tmp_path, model_and_processor):
    model, processor = model_and_processor
    chat = ChatSession(model, processor)
    chat.ask("Hello there.", max_tokens=2)
    chat.save(tmp_path / "c.safetensors")
    other, other_processor = load(MODEL, dtype=mx.float32 if DTYPE == mx.float16 else mx.float16)  # not ours
    with pytest.raises(FastVLMError, match="different model"):
        ChatSession.load(tmp_path / "c.safetensors", other, other_processor)
    with pytest.raises(FastVLMError, match="not a conversation"):
        ChatSession.load(FIXTURES / "reference.safetensors", model, processor)
    with pytest.raises(FastVLMError, match="no such file"):
        ChatSession.load(tmp_path / "none.safetensors", model, processor)


# -------------------------------------------------------------------------- image cache
def test_repeated_image_skips_the_tower(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    engine = Engine(model, processor)
    calls = []
    original = FastVLM.encode_image
    monkeypatch.setattr(FastVLM, "encode_image", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    messages = one_turn("Describe the image.", PHOTO)
    first = list(engine.stream(engine.prepare(messages), engine_sampling(8)))
    second = list(engine.stream(engine.prepare(messages), engine_sampling(8)))
    assert calls == [1]
    assert [r.token for r in first] == [r.token for r in second]
    assert mx.array_equal(first[0].logprobs, second[0].logprobs).item()
    assert second[0].vision_ms < first[0].vision_ms and engine.image_cache.hits == 1
    # two new images in one request: one batched tower call
    list(engine.stream(engine.prepare(one_turn("Compare.", [PHOTO2, PHOTO2.read_bytes(), PHOTO])), engine_sampling(2)))
    assert calls == [1, 1]  # PHOTO2 twice is one image; PHOTO was cached
    list(engine.stream(engine.prepare(one_turn("Compare.", [PHOTO2, _flipped(PHOTO)])), engine_sampling(2)))
    assert calls == [1, 1, 1]


def _flipped(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))[::-1].copy()


def engine_sampling(n):
    from fastvlm_mlx.engine import Sampling

    return Sampling(max_tokens=n)


def test_image_cache_is_bounded_and_can_be_disabled(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    one = model.encode_image(processor.preprocess(PHOTO))[0]
    cache = ImageFeatureCache(int(one.nbytes * 2.5))
    for i in range(5):
        cache.put(str(i), one + i)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 2 and cache.get("4") is not None and cache.get("0") is None
    engine = engine_for(model, processor, image_cache_bytes=0)
    calls = []
    original = FastVLM.encode_image
    monkeypatch.setattr(FastVLM, "encode_image", lambda self, x: calls.append(1) or original(self, x))
    generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=2)
    generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=2)
    assert len(calls) == 2 and len(engine.image_cache) == 0
    engine_for(model, processor, image_cache_bytes=256 << 20)
    with pytest.raises(FastVLMError, match=">= 0"):
        ImageFeatureCache(-1)


# --------------------------------------------------------------------------------- chat CLI
def test_chat_cli_piped(tmp_path, model_and_processor):
    model, processor = model_and_processor
    script = (
        "\n".join(
            [
                f"/image {PHOTO}",
                "Describe the image.",
                f"/image {tmp_path / 'missing.png'}",
                "What colour is the ball?",
                "/reset",
                "Hello there.",
                f"/save {tmp_path / 'c.safetensors'}",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    proc = run_cli("fastvlm_mlx.chat", "--model", MODEL, "--max-tokens", "4", "--verbose", input=script)
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.split("\n")[:-1]
    assert len(answers) == 3, proc.stdout
    assert answers[0] == generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=4)
    chat = ChatSession(model, processor)
    chat.ask("Describe the image.", [PHOTO], max_tokens=4)
    assert answers[1] == chat.ask("What colour is the ball?", max_tokens=4)
    assert answers[2] == generate(model, processor, "Hello there.", max_tokens=4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.png" in errors[0] and "no such file" in errors[0]
    stats = [line for line in proc.stderr.splitlines() if line.startswith("TTFT")]
    assert len(stats) == 3 and "0 cached" in stats[0] and "0 cached" not in stats[1]
    assert (tmp_path / "c.safetensors").is_file()
    assert "Traceback" not in proc.stderr


def test_chat_cli_bad_model_is_one_line():
    assert_clean_error(run_cli("fastvlm_mlx.chat", "--model", str(FIXTURES / "nope"), input=""), "nope")
