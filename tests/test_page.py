"""The web page's chat view in a real browser: the distribution's Chromium driven by Playwright (tests/browser.py),
against real servers on loopback ports with the fixture model. The page's answers are checked against the same
requests sent through the API, and what it sends is watched on the wire.

The trained demo model (examples/demo/model) answers one question on the page for the README: its screenshot goes
to $FASTVLM_SCREENSHOTS/page-chat.png when that variable names a folder (docs/images/ for the README), else to the
test's temporary folder."""

import base64
import io
import json
import os
import re
import time
from pathlib import Path

import pytest
from browser import launch, playwright  # noqa: F401 (a fixture)
from conftest import PHOTO, PHOTO2, ROOT
from test_demo import DEMO, make_demo
from test_server import Server, data_url, image_turn

httpx = pytest.importorskip("httpx", reason="the page tests need httpx (pip install -e '.[test]')")
openai = pytest.importorskip("openai", reason="the page tests need the openai client (pip install -e '.[test]')")
jsonschema = pytest.importorskip("jsonschema", reason="the page tests need jsonschema (pip install -e '.[test]')")

KEY = "page-key"
WAIT_MS = 30_000  # every wait in the browser is bounded by this
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def browser(playwright):  # noqa: F811 (the fixture, imported)
    b = launch(playwright)
    yield b
    b.close()


def open_page(browser, url, **context):
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    return page


@pytest.fixture
def page(browser, server):
    p = open_page(browser, server.url)
    p.wait_for_selector("#chat-input")
    yield p
    p.context.close()


def settings(page, temperature="0", max_tokens="16", system="", schema=""):
    if not page.locator("details.settings").evaluate("d => d.open"):
        page.click("details.settings summary")
    page.fill("#chat-temperature", temperature)
    page.fill("#chat-max-tokens", max_tokens)
    page.fill("#chat-system", system)
    page.fill("#chat-schema", schema)


def answers(page):
    return page.locator(".turn.assistant")


def ask(page, text, images=()):
    """Sends a message from the composer and waits for its answer to end; returns the answer's item."""
    n = answers(page).count()
    if images:
        page.set_input_files("#chat-files", [str(p) for p in images])
        page.wait_for_function(f"document.querySelectorAll('.attachments img').length === {len(images)}")
    page.fill("#chat-input", text)
    page.click("button.send")
    return finished_answer(page, n)


def finished_answer(page, index):
    page.wait_for_function(
        f"() => {{ const a = document.querySelectorAll('.turn.assistant')[{index}];"
        " return a && !a.classList.contains('streaming') && !document.querySelector('.send').disabled; }"
    )
    return answers(page).nth(index)


def api_answer(client, messages, **kw):
    """The same request through the API, streamed as the page streams it: the text and the last chunk."""
    chunks = list(
        client.chat.completions.create(
            model="fastvlm", messages=messages, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1]


def screenshot_path(tmp_path) -> Path:
    folder = Path(os.environ.get("FASTVLM_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "page-chat.png"


def metric(server, name) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# ------------------------------------------------------------------------------------ answering
def test_answer_equals_the_api_and_shows_timings(page, client):
    settings(page)
    answer = ask(page, QUESTION, [PHOTO])
    text = answer.locator(".text").inner_text()
    messages = [image_turn(QUESTION, PHOTO)]
    expected, last = api_answer(client, messages, temperature=0, max_tokens=16)
    assert text == expected and text
    timings = last.model_extra["timings"]  # the openai client keeps the extension as an extra field
    assert set(timings) == {"ttft_ms", "vision_ms", "prompt_ms", "tokens_per_second", "cached_tokens"}
    assert timings["cached_tokens"] == last.usage.prompt_tokens_details.cached_tokens > 0  # the page asked first
    assert 0 <= timings["vision_ms"] <= timings["ttft_ms"] and timings["tokens_per_second"] > 0
    stats = answer.locator(".stats").inner_text()
    assert re.search(r"TTFT [\d.]+ ms · vision [\d.]+ ms · [\d.]+ tokens/s · 0 cached tokens", stats), stats
    non_streamed = client.chat.completions.create(model="fastvlm", messages=messages, temperature=0, max_tokens=16)
    assert non_streamed.choices[0].message.content == expected and non_streamed.model_extra["timings"]["ttft_ms"] > 0


def test_the_demo_model_names_the_shape_on_the_page(browser, tmp_path):
    """The trained demo model, as the README's first commands serve it: its answer to a drawing of a triangle is
    the word, streamed, with its timings under it; the README's screenshot of the chat is taken here."""
    s = Server(model=str((DEMO / "model").relative_to(ROOT)))  # the path the README names, shown in the header
    try:
        page = open_page(browser, s.url, viewport={"width": 900, "height": 700})
        try:
            page.wait_for_selector("#chat-input")
            settings(page, max_tokens="16")
            page.click("details.settings summary")  # closed again: the picture shows the conversation
            answer = ask(page, make_demo.QUESTION, [DEMO / "images" / "triangle.png"])
            assert answer.locator(".text").inner_text() == "triangle"
            stats = answer.locator(".stats").inner_text()
            assert re.search(r"^TTFT [\d.]+ ms · vision [\d.]+ ms · [\d.]+ tokens/s · 0 cached tokens", stats), stats
            assert page.locator(".turn.user img").count() == 1 and page.locator(".turn.error").count() == 0
            page.locator("#chat-input").focus()
            page.screenshot(path=str(screenshot_path(tmp_path)), full_page=True)
        finally:
            page.context.close()
    finally:
        s.stop()


def test_stop_ends_the_stream_and_the_server_counts_it_cancelled(page, server):
    before = metric(server, "fastvlm_requests_cancelled_total")
    settings(page, temperature="0", max_tokens="2000")
    page.fill("#chat-input", "Hello there.")  # greedy, the fixture answers this to its context's end
    page.click("button.send")
    page.wait_for_function("document.querySelector('.turn.assistant.streaming .text')?.textContent.length > 0")
    page.click("button.stop")
    answer = finished_answer(page, 0)
    assert "stopped" in answer.locator(".stats").inner_text()
    assert page.locator("button.stop").is_disabled() and page.locator("button.send").is_enabled()
    deadline = time.time() + 10
    while metric(server, "fastvlm_requests_cancelled_total") < before + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(server, "fastvlm_requests_cancelled_total") == before + 1
    assert metric(server, "fastvlm_running_batch_size") == 0


def test_edit_and_retry_a_turn(page, client):
    settings(page, max_tokens="8")
    first = ask(page, "Hello there.").locator(".text").inner_text()
    ask(page, "And then?")
    assert page.locator(".turn").count() == 4
    page.locator(".turn.user").nth(0).get_by_role("button", name="Ask this message again").click()
    assert finished_answer(page, 0).locator(".text").inner_text() == first
    assert page.locator(".turn").count() == 2  # the later turns are gone
    ask(page, "And then?")
    page.locator(".turn.user").nth(0).get_by_role("button", name="Edit this message").click()
    assert page.input_value("#chat-input") == "Hello there." and page.is_visible(".editing")
    page.fill("#chat-input", "What colours are there?")
    page.keyboard.press("Enter")
    edited = finished_answer(page, 0).locator(".text").inner_text()
    assert (
        page.locator(".turn").count() == 2
        and page.locator(".turn.user .text").inner_text() == "What colours are there?"
    )
    expected, _ = api_answer(
        client, [{"role": "user", "content": "What colours are there?"}], temperature=0, max_tokens=8
    )
    assert edited == expected


def test_json_schema_box(page, server):
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.url.endswith("/v1/chat/completions") else None)
    settings(page, max_tokens="48", schema="{not json")
    page.fill("#chat-input", "Name a colour.")
    page.click("button.send")
    assert "not valid JSON" in page.inner_text("#chat-schema-error")
    assert page.get_attribute("#chat-schema", "aria-invalid") == "true"
    page.wait_for_timeout(500)
    assert posts == [] and page.locator(".turn").count() == 0  # nothing sent
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    page.fill("#chat-schema", json.dumps(schema))
    assert page.inner_text("#chat-schema-error") == ""
    text = ask(page, "Name a colour.").locator(".text").inner_text()
    jsonschema.validate(json.loads(text), schema)
    assert len(posts) == 1


def test_images_chosen_pasted_dropped_scaled_and_removed(page, tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1200), (200, 40, 40)).save(big, quality=95)
    page.set_input_files("#chat-files", [str(PHOTO), str(big)])
    page.wait_for_function("document.querySelectorAll('.attachments img').length === 2")
    photo = base64.b64encode(PHOTO2.read_bytes()).decode()
    for kind in ("paste", "drop"):  # synthetic events carrying a file, as the clipboard and a drag would
        page.evaluate(
            """([kind, b64]) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const data = new DataTransfer();
                data.items.add(new File([bytes], kind + ".png", {type: "image/png"}));
                const target = document.querySelector(kind === "paste" ? "#chat-input" : ".composer");
                const event = kind === "paste"
                    ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true})
                    : new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
                target.dispatchEvent(event);
            }""",
            [kind, photo],
        )
    page.wait_for_function("document.querySelectorAll('.attachments img').length === 4")
    urls = page.eval_on_selector_all(".attachments img", "imgs => imgs.map((i) => [i.alt, i.src])")
    assert [alt for alt, _ in urls] == ["photo.png", "big.jpg", "paste.png", "drop.png"]
    assert urls[0][1] == data_url(PHOTO)  # a small image goes as its own bytes
    assert urls[2][1] == urls[3][1] == data_url(PHOTO2)
    scaled = Image.open(io.BytesIO(base64.b64decode(urls[1][1].split(",", 1)[1])))
    assert scaled.format == "JPEG" and scaled.size == (1024, 512)
    page.get_by_role("button", name="Remove big.jpg").click()
    assert page.eval_on_selector_all(".attachments img", "imgs => imgs.map((i) => i.alt)") == [
        "photo.png", "paste.png", "drop.png"
    ]  # fmt: skip
    settings(page, max_tokens="4")
    ask(page, "Compare them.")
    assert page.locator(".turn.user img").count() == 3 and page.locator(".attachments img").count() == 0


def test_keyboard_alone_and_labels(page):
    settings(page, max_tokens="4")
    page.locator("h1").click()  # start from the top of the page, then only keys
    for _ in range(30):
        if page.evaluate("document.activeElement.id") == "chat-input":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "chat-input"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"  # focus is visible
    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("there.")
    assert page.input_value("#chat-input") == "Hello\nthere."
    page.keyboard.press("Enter")
    finished_answer(page, 0)
    assert page.locator(".turn.user .text").inner_text() == "Hello\nthere."
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('#chat-view :is(button, input, textarea), header :is(button, input)')]
            .filter((e) => !(e.getAttribute('aria-label') || e.labels?.length
                             || (e.tagName === 'BUTTON' && e.textContent.trim())))
            .map((e) => e.outerHTML)"""
    )
    assert unlabelled == []


def test_fits_a_phone(browser, server):
    page = open_page(browser, server.url, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page.wait_for_selector("#chat-input")
        settings(page, max_tokens="16")
        ask(page, "Describe the image in many words, please, with every detail you can see.", [PHOTO, PHOTO2])
        page.click("details.settings summary")
        width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1] == 375, width
    finally:
        page.context.close()


# ------------------------------------------------------------------------------------ API key, --no-ui
def test_a_wrong_key_shows_once_and_sends_nothing_more(browser):
    s = Server("--api-key", KEY)
    try:
        for path in ("/", "/ui/app.js", "/ui/style.css"):
            assert httpx.get(s.url + path, timeout=10).status_code == 200, path
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(s.url + "/ui/../v1/models", timeout=10).status_code == 401
        page = open_page(browser, s.url)
        try:
            page.wait_for_selector("#api-key", state="visible")
            assert page.get_by_label("API key").is_visible()
            page.fill("#api-key", "wrong")
            page.press("#api-key", "Enter")
            page.wait_for_function(
                "document.querySelector('#status').textContent.includes('invalid or missing API key')"
            )
            sent = []
            page.on("request", lambda r: sent.append(r.url))
            page.wait_for_timeout(3000)
            assert sent == []
            assert page.get_by_text("invalid or missing API key").count() == 1
            assert not page.is_visible("#chat-input")
            page.fill("#api-key", KEY)
            page.click("#key-form button")
            page.wait_for_selector("#chat-input")
            assert page.is_hidden("#key-form")
            settings(page, max_tokens="4")
            ask(page, "Hello there.")
            assert page.locator(".turn.error").count() == 0
            page.evaluate("sessionStorage.setItem('fastvlm.apiKey', 'revoked')")  # the key stops working mid-chat
            page.fill("#chat-input", "Hello again.")
            page.click("button.send")
            page.wait_for_selector(".turn.error")
            assert page.locator(".turn.error").inner_text() == "Error: invalid or missing API key"
            assert page.is_visible("#api-key") and page.locator(".turn.assistant").count() == 1
        finally:
            page.context.close()
    finally:
        s.stop()


def test_no_ui_serves_no_page():
    s = Server("--no-ui")
    try:
        assert httpx.get(s.url + "/", timeout=10).status_code == 404
        assert httpx.get(s.url + "/ui/app.js", timeout=10).status_code == 404
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 200
    finally:
        s.stop()


def test_errors_are_one_line_each(page, server):
    settings(page, temperature="5")  # out of range: the server's 400, word for word
    page.fill("#chat-input", "Hello there.")
    page.click("button.send")
    page.wait_for_selector(".turn.error")
    assert page.locator(".turn.error").count() == 1 and "temperature" in page.inner_text(".turn.error")
    page.click("button.clear")
    settings(page, max_tokens="4")
    page.route("**/v1/chat/completions", lambda route: route.abort())
    page.fill("#chat-input", "Hello there.")
    page.click("button.send")
    page.wait_for_selector(".turn.error")
    assert page.locator(".turn.error").count() == 1 and page.locator(".turn.assistant").count() == 0
    assert "cannot reach the server" in page.inner_text(".turn.error")
    page.unroute("**/v1/chat/completions")
    page.fill("#chat-input", "Hello there.")
    page.click("button.send")
    finished_answer(page, 0)
    assert page.locator(".turn.error").count() == 1  # shown once, not again
