"""The page's live camera mode in a real browser: Chromium's fake camera plays a synthetic video of solid colours
(a new colour every second, and a corner square that makes every frame a new picture), and the page captions it
through the fixture model's server.  What the server received is compared with what the video showed."""

import base64
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from browser import launch, playwright  # noqa: F401  (the fixture)
from test_server import Server, httpx

from benchmarks.live import write_y4m
from fastvlm_mlx.server.config import MB

PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
FPS = 10
WIDTH, HEIGHT = 320, 240  # 4:3, wider than the fixture model's 256 px, so the page scales it down
CACHE_MB = 0.04  # ten of the fixture model's 4 KiB image features: live frames fill it within seconds


def nearest(rgb) -> str:
    return min(PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(PALETTE[name], rgb)))


def frame_of(body: dict):
    """The picture a chat request carries (a JPEG data URL), as an array."""
    from PIL import Image

    (part,) = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    head, data = part["image_url"]["url"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


# Samples what the page's video element shows, every 20 ms, with the browser's clock: the reference the frames the
# server received are checked against.  It reads the video the page plays; it does not touch the page's code.
WATCH_VIDEO = """
window.__shown = [];
setInterval(() => {
  const video = document.querySelector('#live-view video');
  if (!video || video.readyState < 2 || !video.videoWidth) return;
  const canvas = window.__watch || (window.__watch = document.createElement('canvas'));
  canvas.width = 8; canvas.height = 8;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, 8, 8);
  const d = ctx.getImageData(0, 0, 8, 8).data;
  const mean = [0, 1, 2].map((c) => { let s = 0; for (let i = c; i < d.length; i += 4) s += d[i]; return s / 64; });
  window.__shown.push([Date.now(), mean]);
}, 20);
"""

# Hides the tab as the browser would when another tab covers it (headless Chromium keeps a background page
# "visible", so the Page Visibility state is set here and its event dispatched).
SET_HIDDEN = """(hidden) => {
  Object.defineProperty(document, 'hidden', { value: hidden, configurable: true });
  Object.defineProperty(document, 'visibilityState', { value: hidden ? 'hidden' : 'visible', configurable: true });
  document.dispatchEvent(new Event('visibilitychange'));
}"""


def gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f"fastvlm_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


class Traffic:
    """The page's chat requests as the browser's network saw them: each one's start and end, the most in
    flight at once, and each request's body."""

    def __init__(self, page):
        self.open = 0
        self.most = 0
        self.sent = []  # (request, body)
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._end)

    @staticmethod
    def ours(request) -> bool:
        return request.url.endswith("/v1/chat/completions")

    def _start(self, request):
        if self.ours(request):
            self.open += 1
            self.most = max(self.most, self.open)
            self.sent.append((request, json.loads(request.post_data)))

    def _end(self, request):
        if self.ours(request):
            self.open -= 1


@pytest.fixture(scope="module")
def server():
    s = Server("--image-cache-mb", str(CACHE_MB), "--max-tokens-limit", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("camera") / "colours.y4m"
    write_y4m(path, list(PALETTE.values()), fps=FPS, size=(WIDTH, HEIGHT))
    return path


def open_live(playwright, server, video):  # noqa: F811
    browser = launch(
        playwright,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    )
    page = browser.new_page(viewport={"width": 900, "height": 820})
    page.add_init_script(WATCH_VIDEO)
    answers = []
    page.expose_function("__answer", lambda detail: answers.append(detail))
    traffic = Traffic(page)
    page.goto(server.url + "/", timeout=30_000)
    page.locator("#live-view .live-start").wait_for(state="attached", timeout=30_000)  # the view is built
    page.get_by_role("button", name="Live camera").click()
    page.evaluate("document.getElementById('live-view').addEventListener('answer', (e) => __answer(e.detail))")
    return browser, page, traffic, answers


def wait_for(predicate, timeout: float, what: str, page):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(100)


def shown_at(samples, t_ms: float, within_ms: float) -> set[str]:
    """The colours the video may have shown at ``t_ms``, give or take ``within_ms`` before it: from the last
    sample before that window to the first sample after ``t_ms`` (the sampler runs on the page's busy main
    thread, so a change can be seen late, never early)."""
    before = [s for s in samples if s[0] <= t_ms - within_ms]
    window = [s for s in samples if t_ms - within_ms < s[0] <= t_ms]
    after = [s for s in samples if s[0] > t_ms]
    return {nearest(mean) for _, mean in before[-1:] + window + after[:1]}


def test_live_captions_fresh_frames_one_at_a_time(playwright, server, video, tmp_path):  # noqa: F811
    browser, page, traffic, answers = open_live(playwright, server, video)
    try:
        misses_before = gauge(server.url, "image_cache_misses_total")
        page.get_by_role("button", name="Start camera").click()
        wait_for(lambda: len(answers) >= 25, 45, "25 live answers", page)

        # captions keep arriving, each with its TTFT on screen
        caption = page.locator("#live-caption")
        assert caption.inner_text().strip() != ""
        assert page.locator(".live-ttft").inner_text().startswith("TTFT ")
        assert all(a["ttft_ms"] is not None and 0 < a["ttft_ms"] <= a["total_ms"] for a in answers)
        shot = Path(os.environ.get("FASTVLM_SCREENSHOTS") or tmp_path)
        shot.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot / "page-live.png"))

        # one request in flight, never more
        assert traffic.most == 1, traffic.most
        # frames scaled in the browser to the model's size (256 px: 320x240 becomes 256x192)
        sent = [(request, body) for request, body in traffic.sent]
        assert frame_of(sent[0][1]).shape == (192, 256, 3)
        assert all(body["max_tokens"] <= 64 and body["stream"] for _, body in sent)
        texts = {p["text"] for _, body in sent for p in body["messages"][0]["content"] if p["type"] == "text"}
        assert texts == {"Describe what you see in one sentence."}

        # fresh frames: what each request carried is what the video showed when it was sent (within one video
        # frame plus the time the page takes to capture and encode it); a stale, queued frame would show a
        # colour from earlier
        samples = page.evaluate("window.__shown")
        colours_seen = set()
        boundary = 0
        for request, body in sent[:-1]:  # the last may be in flight, its timing not yet known
            started = request.timing["startTime"]
            colour = nearest(frame_of(body).reshape(-1, 3).mean(axis=0))
            colours_seen.add(colour)
            assert colour in shown_at(samples, started, within_ms=1000 / FPS + 50), (colour, started)
            boundary += len(shown_at(samples, started, within_ms=1000 / FPS + 50)) > 1
        assert len(colours_seen) >= 3, colours_seen  # the frames followed the video through its colours
        assert boundary <= len(sent) // 2

        # hiding the tab stops requests; showing it again resumes them
        page.evaluate(SET_HIDDEN, True)
        page.wait_for_timeout(300)  # the one in flight is aborted
        count = len(traffic.sent)
        page.wait_for_timeout(2000)
        assert len(traffic.sent) == count and traffic.open == 0
        assert page.locator(".live-state").inner_text() == "Paused"
        page.evaluate(SET_HIDDEN, False)
        wait_for(lambda: len(traffic.sent) > count + 2, 20, "requests after the tab is shown again", page)

        # leaving the view stops them too
        page.get_by_role("button", name="Chat").click()
        page.wait_for_timeout(300)
        count = len(traffic.sent)
        page.wait_for_timeout(1500)
        assert len(traffic.sent) == count and traffic.most == 1

        # every live frame was a new picture for the image-feature cache, which stayed within its bound
        misses = gauge(server.url, "image_cache_misses_total") - misses_before
        assert misses >= 20, misses
        cached = gauge(server.url, "image_cache_bytes")
        assert 0.5 * CACHE_MB * MB < cached <= CACHE_MB * MB, cached
    finally:
        browser.close()


def test_live_own_prompt_and_an_error_said_once(playwright, server, video):  # noqa: F811
    """The user's own prompt goes out as typed; one that the server refuses (longer than the fixture model's
    context) stops the loop with one line in the status, and nothing more is sent."""
    browser, page, traffic, answers = open_live(playwright, server, video)
    try:
        page.get_by_label("Prompt", exact=True).select_option("own")
        own = "Name every colour you see. " * 200
        page.get_by_label("Your prompt").fill(own)
        page.get_by_role("button", name="Start camera").click()
        wait_for(lambda: page.locator("#status").inner_text().startswith("Error:"), 20, "the error", page)
        page.wait_for_timeout(1500)
        assert len(traffic.sent) == 1 and not answers
        (part,) = [p for p in traffic.sent[0][1]["messages"][0]["content"] if p["type"] == "text"]
        assert part["text"] == own.strip()
        assert "context" in page.locator("#status").inner_text()
        assert page.get_by_role("button", name="Start camera").get_attribute("aria-pressed") == "false"
    finally:
        browser.close()
