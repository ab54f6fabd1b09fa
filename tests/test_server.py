"""The OpenAI-compatible server, started for real on a loopback port and driven by the `openai` client
(and raw httpx for malformed requests).  Every server a test starts is stopped by it."""

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, ROOT

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install -e '.[test]')")
openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install -e '.[test]')")

from fastvlm_mlx import generate, load  # noqa: E402

MODEL = str(FIXTURES / "format_a")
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags, model: str = MODEL):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastvlm_mlx.server", "--model", model, "--port", str(self.port), *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start within 120 s")

    def rss_mb(self) -> float:
        """The server's resident memory, by ps (Linux and macOS alike; macOS has no /proc)."""
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.proc.pid)], capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0]) / 1024  # kB

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server():
    s = Server(
        "--api-key",
        KEY,
        "--allowed-image-dir",
        str(FIXTURES / "images"),
        "--max-image-mb",
        "1",
        "--max-body-mb",
        "4",
        "--max-tokens-limit",
        "64",
        "--image-cache-mb",
        "8",
        "--prompt-cache-mb",
        "32",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def image_turn(text, *paths):
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in paths]
        + [{"type": "text", "text": text}],
    }


def local_messages(messages):
    """The same conversation for generate(): image_url parts become image parts of the decoded files."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "text":
                parts.append(p)
            else:
                parts.append({"type": "image", "image": base64.b64decode(p["image_url"]["url"].split(",", 1)[1])})
        out.append({"role": m["role"], "content": parts})
    return out


def ask(client, messages, **kw):
    return client.chat.completions.create(model="fastvlm", messages=messages, **kw)


def post(server, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is None:
        return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    return httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers, timeout=120)


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for w in words:
        assert w.lower() in json.dumps(error).lower(), error
    assert "Traceback" not in response.text


# ------------------------------------------------------------------------------ correctness
def test_answers_equal_generate(client, local):
    model, processor = local
    messages = [image_turn("Describe the image.", PHOTO)]
    expected = generate(model, processor, messages=local_messages(messages), max_tokens=16)
    r = ask(client, messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 72 and r.usage.completion_tokens == 16
    assert r.id.startswith("chatcmpl-") and r.model == MODEL and r.created > 0  # the served model
    chunks = list(ask(client, messages, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: served from the cache
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_multi_turn_and_two_images(client, local):
    model, processor = local
    conversations = [
        [
            image_turn("Describe the image.", PHOTO),
            {"role": "assistant", "content": "A red ball."},
            {"role": "user", "content": "What colour is the ball?"},
        ],
        [{"role": "system", "content": "You answer briefly."}, image_turn("Compare the two images.", PHOTO, PHOTO2)],
    ]
    for messages in conversations:
        expected = generate(model, processor, messages=local_messages(messages), max_tokens=12)
        assert ask(client, messages, max_tokens=12).choices[0].message.content == expected


def test_local_files_under_the_allowed_directory(client, local):
    model, processor = local
    r = ask(
        client,
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": str(PHOTO)}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        max_tokens=8,
    )
    assert r.choices[0].message.content == generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=8)


def test_stop_strings_end_the_answer_and_never_leak(client, local):
    model, processor = local
    messages = [{"role": "user", "content": "Hello there."}]
    full = generate(model, processor, messages=messages, max_tokens=24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    expected = full[: full.index(stop)]
    r = ask(client, messages, max_tokens=24, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(ask(client, messages, max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_logprobs(client):
    r = ask(client, [{"role": "user", "content": "Hello there."}], max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy: the best token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob <= 0
    assert "".join(e.token for e in content) == r.choices[0].message.content


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_greedy_requests_equal_sequential(client):
    images = [PHOTO, PHOTO2, None, PHOTO]
    requests = [
        [image_turn(f"Question {i}: what is shown?", images[i % 4])]
        if images[i % 4]
        else [{"role": "user", "content": f"Question {i}: hello there."}]
        for i in range(16)
    ]
    one = lambda m: ask(client, m, max_tokens=10).choices[0].message.content  # noqa: E731
    sequential = [one(m) for m in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, requests))
    assert concurrent == sequential


def test_each_request_keeps_its_own_sampling_in_a_batch(client):
    settings = [
        dict(temperature=0.8, seed=1),
        dict(temperature=1.2, seed=2, top_p=0.9),
        dict(temperature=0),
        dict(temperature=1.0, seed=3, extra_body={"top_k": 5}),
        dict(temperature=0.7, seed=4, extra_body={"min_p": 0.05, "repetition_penalty": 1.1}),
        dict(temperature=1.5, seed=5),
    ]
    messages = [{"role": "user", "content": "Hello there."}]
    one = lambda s: ask(client, messages, max_tokens=12, **s).choices[0].message.content  # noqa: E731
    alone = [one(s) for s in settings]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(one, settings))
    assert together == alone
    assert len(set(alone)) > 2  # the settings really differ


# ------------------------------------------------------------------------------ bad input
def _png_header_only(width, height) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _image_body(data: bytes):
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
            }
        ],
        "max_tokens": 2,
    }


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    truncated = open(PHOTO, "rb").read()[:400]
    big = os.urandom(1_200_000)
    good = {"messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 2}
    cases = [
        (post(server, None, raw=b"{not json"), 400, "json"),
        (post(server, {"max_tokens": 2}), 400, "messages"),
        (post(server, {"messages": [{"role": "wizard", "content": "hi"}]}), 400, "role"),
        (post(server, _image_body(b"not an image at all")), 400, "image"),
        (post(server, _image_body(truncated)), 400, "truncated"),
        (post(server, _image_body(_png_header_only(30000, 30000))), 400, "pixels"),
        (post(server, _image_body(_png_header_only(8000, 6000))), 400, "8000x6000"),  # under PIL's own bomb limit
        (post(server, _image_body(big)), 400, "limit"),
        (post(server, {"messages": [{"role": "user", "content": "word " * 600}]}), 400, "context"),
        (post(server, dict(good, max_tokens=0)), 400, "max_tokens"),
        (post(server, dict(good, max_tokens=-3)), 400, "max_tokens"),
        (post(server, dict(good, tools=[{"type": "function"}])), 400, "tools"),
        (post(server, dict(good, n=2)), 400, "n"),
        (post(server, dict(good, response_format={"type": "xml"})), 400, "response_format"),
        (
            post(
                server,
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": str(ROOT / "README.md")}}],
                        }
                    ]
                },
            ),
            403,
            "outside",
        ),
        (post(server, good, key="wrong"), 401, "api key"),
        (post(server, good, key=None), 401, "api key"),
        (post(server, None, raw=b"x" * (5 << 20)), 413, "body"),
    ]
    for response, status, word in cases:
        assert_error(response, status, word)
        assert post(server, good).status_code == 200  # and the next good request is answered
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed there
    assert httpx.get(server.url + "/v1/models").status_code == 401
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["id"]


def test_client_that_drops_mid_stream_leaves_the_batch(server, client):
    body = {"messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 64, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        lines = response.iter_lines()
        next(lines), next(lines)
    # the sequence is removed at once: the running batch empties long before 64 tokens could be generated
    deadline = time.time() + 10
    while time.time() < deadline:
        text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if "fastvlm_running_batch_size 0" in text:
            break
        time.sleep(0.1)
    assert "fastvlm_running_batch_size 0" in text
    assert (
        ask(client, [{"role": "user", "content": "Hello there."}], max_tokens=3).choices[0].message.content is not None
    )


def test_metrics(server, client):
    ask(client, [image_turn("Describe the image.", PHOTO)], max_tokens=2)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        'fastvlm_requests_total{status="200"}',
        "fastvlm_prompt_tokens_total",
        "fastvlm_cached_tokens_total",
        "fastvlm_generated_tokens_total",
        "fastvlm_ttft_seconds_bucket",
        "fastvlm_request_latency_seconds_count",
        "fastvlm_queue_depth",
        "fastvlm_running_batch_size",
        "fastvlm_image_cache_hits_total",
        "fastvlm_image_cache_bytes",
        'fastvlm_requests_total{status="400"}',
    ):
        assert name in text, name


def test_full_queue_is_429_with_retry_after():
    s = Server("--max-batch", "1", "--max-queue", "1")
    try:
        body = {"messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 48}
        with ThreadPoolExecutor(6) as pool:
            statuses = list(
                pool.map(lambda _: httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120), range(6))
            )
        refused = [r for r in statuses if r.status_code == 429]
        assert refused and all(r.headers.get("retry-after") for r in refused)
        assert_error(refused[0], 429, "busy")
        assert any(r.status_code == 200 for r in statuses)
    finally:
        s.stop()


def test_load_200_requests_bounded_memory(server, client):
    """Loopback only, bounded: 200 requests at concurrency 8; RSS may grow by the cache bounds plus a margin."""
    messages = [[image_turn(f"Describe image {i % 4}.", PHOTO if i % 2 else PHOTO2)] for i in range(200)]
    ask(client, messages[0], max_tokens=4)
    before = server.rss_mb()
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda m: ask(client, m, max_tokens=4), messages))
    elapsed = time.perf_counter() - start
    assert all(r.choices[0].message.content is not None for r in results)
    growth = server.rss_mb() - before
    print(f"\n200 requests at concurrency 8: {200 / elapsed:.1f} requests/s, RSS growth {growth:.0f} MB")
    assert growth < 8 + 32 + 200  # image cache 8 MB + prompt cache 32 MB + 200 MB margin (allocator, fragmentation)


def test_remote_images_only_when_allowed_and_never_redirected_elsewhere(local):
    """http(s) image URLs, served here on loopback: fetched with --allow-remote-images, a redirect to another
    host (127.0.0.2) refused, a file over the size cap refused; without the flag every URL is refused."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    photo = open(PHOTO, "rb").read()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/photo.png":
                self.send_response(200), self.send_header("Content-Length", str(len(photo))), self.end_headers()
                self.wfile.write(photo)
            elif self.path == "/same-host":
                self.send_response(302), self.send_header("Location", "/photo.png"), self.end_headers()
            elif self.path == "/other-host":
                (
                    self.send_response(302),
                    self.send_header("Location", f"http://127.0.0.2:{port}/photo.png"),
                    self.end_headers(),
                )
            else:
                big = b"\0" * (2 << 20)
                self.send_response(200), self.send_header("Content-Length", str(len(big))), self.end_headers()
                self.wfile.write(big)

        def log_message(self, *args):
            pass

    images = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = images.server_address[1]
    threading.Thread(target=images.serve_forever, daemon=True).start()
    s = Server("--allow-remote-images", "--max-image-mb", "1")
    plain = Server()
    try:

        def body(path):
            return {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}{path}"}},
                            {"type": "text", "text": "Describe the image."},
                        ],
                    }
                ],
                "max_tokens": 6,
            }

        model, processor = local
        expected = generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=6)
        for path in ("/photo.png", "/same-host"):
            r = httpx.post(s.url + "/v1/chat/completions", json=body(path), timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected
        assert_error(
            httpx.post(s.url + "/v1/chat/completions", json=body("/other-host"), timeout=120), 400, "another host"
        )
        assert_error(httpx.post(s.url + "/v1/chat/completions", json=body("/big"), timeout=120), 400, "limit")
        assert_error(
            httpx.post(plain.url + "/v1/chat/completions", json=body("/photo.png"), timeout=120), 400, "remote"
        )
    finally:
        s.stop()
        plain.stop()
        images.shutdown()


# ------------------------------------------------------------------------------ the request model
def test_request_model_checks_json_types_and_names_the_field():
    from fastvlm_mlx.server import APIError, ChatCompletionRequest

    good = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (dict(good, max_tokens=True), "max_tokens", "max_tokens: input should be a valid integer"),
        (dict(good, temperature="0.5"), "temperature", "temperature: input should be a valid number"),
        (dict(good, audio={}, logit_bias={"1": 2}), "audio", "unsupported field(s): audio, logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages", "messages[0].content[0]: "),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages", "tool_calls"),
        (dict(good, stop=["a", ""]), "stop", "stop[1]: "),
        (dict(good, top_logprobs=21), "top_logprobs", "top_logprobs: "),
    ]
    for body, param, words in cases:
        with pytest.raises(APIError) as caught:
            ChatCompletionRequest.parse(body)
        assert caught.value.status == 400 and caught.value.param == param, caught.value.body()
        assert words in caught.value.message.lower(), caught.value.message
    request = ChatCompletionRequest.parse({
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image_url", "image_url": "a.png"}, {"type": "text", "text": "hi"}]}],
        "stop": "x", "max_completion_tokens": 9, "max_tokens": 3, "temperature": 1,
    })  # fmt: skip
    assert request.engine_messages(lambda url, where: (url, where)) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": ("a.png", "messages[1].content[0]")},
                                     {"type": "text", "text": "hi"}]},
    ]  # fmt: skip
    assert request.stop == ["x"]
    defaults = dict(max_tokens=100, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None, seed=None)
    assert request.sampling_params(defaults, 5) == dict(defaults, max_tokens=5, temperature=1.0)
    assert request.sampling_params(defaults, 50)["max_tokens"] == 9  # max_completion_tokens wins over max_tokens


def test_context_overflow_is_a_typed_error_with_its_code(server, local):
    from fastvlm_mlx.errors import ContextLengthError, FastVLMError

    _, processor = local
    processor.check_length(processor.context_length - 1)
    with pytest.raises(ContextLengthError):
        processor.check_length(processor.context_length)
    assert issubclass(ContextLengthError, FastVLMError)  # the CLIs print it as one line, like every user error
    response = post(server, {"messages": [{"role": "user", "content": "word " * 600}]})
    assert_error(response, 400, "context")
    assert response.json()["error"]["code"] == "context_length_exceeded"
    # another bad conversation is a plain 400 without that code
    response = post(server, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert_error(response, 400, "user")
    assert response.json()["error"]["code"] is None


def test_open_opens_the_page_in_the_browser_once_serving(tmp_path, monkeypatch):
    """``--open`` hands the page's URL to the user's browser (Python's webbrowser, which honours $BROWSER)."""
    opened = tmp_path / "opened"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {opened}\n')
    script.chmod(0o755)
    monkeypatch.setenv("BROWSER", str(script))
    server = Server("--open")
    try:
        deadline = time.time() + 30
        while not opened.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert opened.read_text() == server.url + "/"
        page = httpx.get(opened.read_text(), timeout=10)
        assert page.status_code == 200 and "<title>FastVLM</title>" in page.text
    finally:
        server.stop()
