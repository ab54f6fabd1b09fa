"""The page's live camera mode in a real browser: Chromium's fake camera plays a synthetic video of solid colours
(a new colour every second, and a corner square that makes every frame a new picture), and the page captions it
through the fixture model's server.  What the server received is compared with what the video showed.

Then the trained demo model (examples/demo/model) captions a video of its sample drawings, each caption checked
against the shape the video showed when its frame was taken; the README's screenshot of the live mode (to
$FASTVLM_SCREENSHOTS/page-live.png when that variable names a folder) is taken there."""

import base64
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from browser import launch, playwright  # noqa: F401  (the fixture)
from conftest import ROOT
from test_demo import DEMO, make_demo
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


def open_live(playwright, server, video, watcher=WATCH_VIDEO):  # noqa: F811
    browser = launch(
        playwright,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    )
    page = browser.new_page(viewport={"width": 900, "height": 820})
    page.add_init_script(watcher)
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


def shown_at(samples, t_ms: float, within_ms: float, name=nearest) -> set[str]:
    """The colours (or what ``name`` makes of a sample) the video may have shown at ``t_ms``, give or take
    ``within_ms`` before it: from the last sample before that window to the first sample after ``t_ms`` (the
    sampler runs on the page's busy main thread, so a change can be seen late, never early)."""
    before = [s for s in samples if s[0] <= t_ms - within_ms]
    window = [s for s in samples if t_ms - within_ms < s[0] <= t_ms]
    after = [s for s in samples if s[0] > t_ms]
    return {name(mean) for _, mean in before[-1:] + window + after[:1]}


def test_live_captions_fresh_frames_one_at_a_time(playwright, server, video):  # noqa: F811
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


# ------------------------------------------------------------------------------------ the demo model, live
SHAPE_SECONDS = 2  # each drawing's time on the fake camera
SHAPE_FRAME = (320, 320)  # square, as the model's input is: the page scales it to 256 px and the server pads nothing
THUMB = 24  # the side of the thumbnails that tell the drawings apart

# Samples what the page's video element shows, as WATCH_VIDEO does, but as a small grey thumbnail (the drawings
# differ in shape, not in colour).
WATCH_SHAPES = f"""
window.__thumbs = [];
setInterval(() => {{
  const video = document.querySelector('#live-view video');
  if (!video || video.readyState < 2 || !video.videoWidth) return;
  const canvas = window.__thumb || (window.__thumb = document.createElement('canvas'));
  canvas.width = canvas.height = {THUMB};
  const ctx = canvas.getContext('2d', {{ willReadFrequently: true }});
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(video, 0, 0, {THUMB}, {THUMB});
  const d = ctx.getImageData(0, 0, {THUMB}, {THUMB}).data;
  window.__thumbs.push([Date.now(), Array.from({{ length: d.length / 4 }}, (_, i) => d[4 * i + 1])]);
}}, 20);
"""


def drawings():
    """The demo's sample drawings, scaled (and padded with white) to the camera's frame: name -> RGB array."""
    from PIL import Image, ImageOps

    return {
        shape: np.asarray(ImageOps.pad(Image.open(DEMO / "images" / f"{shape}.png").convert("RGB"), SHAPE_FRAME,
                                       Image.BICUBIC, color=(255, 255, 255)))
        for shape in make_demo.SHAPES
    }  # fmt: skip


def drawing_of(pictures: dict):
    """Names the drawing a thumbnail from WATCH_SHAPES shows: the nearest of the pictures' thumbnails."""
    from PIL import Image

    references = {
        shape: np.asarray(Image.fromarray(rgb).convert("L").resize((THUMB, THUMB), Image.BOX), np.float32).ravel()
        for shape, rgb in pictures.items()
    }
    return lambda thumb: min(references, key=lambda shape: float(((references[shape] - thumb) ** 2).sum()))


def test_live_demo_model_names_each_shape_the_camera_shows(playwright, tmp_path):  # noqa: F811
    """Each live caption is the shape the video showed when the page took its frame (a frame taken within one
    video frame of a change may show either drawing); the README's screenshot of the live mode is taken here."""
    pictures = drawings()
    drawing = drawing_of(pictures)
    video = write_y4m(tmp_path / "shapes.y4m", list(pictures.values()), SHAPE_SECONDS, FPS, SHAPE_FRAME)
    s = Server(model=str((DEMO / "model").relative_to(ROOT)))  # the path the README names, shown in the header
    try:
        browser, page, traffic, answers = open_live(playwright, s, video, watcher=WATCH_SHAPES)
        try:
            page.get_by_label("Prompt", exact=True).select_option("own")
            page.get_by_label("Your prompt").fill(make_demo.QUESTION)
            page.get_by_role("button", name="Start camera").click()
            loop_ms = 1000 * SHAPE_SECONDS * len(pictures)
            wait_for(
                lambda: len(answers) > 1 and answers[-1]["captured_at"] - answers[0]["captured_at"] > loop_ms,
                30, "captions over the whole video", page,
            )  # fmt: skip
            samples = page.evaluate("window.__thumbs")
            captioned = set()
            for a in answers:
                shown = shown_at(samples, a["captured_at"], within_ms=1000 / FPS + 50, name=drawing)
                assert a["text"] in shown, (a["text"], shown, a["captured_at"])
                captioned.add(a["text"])
            assert len(captioned) >= 3, captioned
            texts = {
                p["text"] for _, body in traffic.sent for p in body["messages"][0]["content"] if p["type"] == "text"
            }
            assert texts == {make_demo.QUESTION} and traffic.most == 1

            # the picture for the README: taken while the caption names the drawing on screen, early in its time there
            deadline = time.time() + 10
            while True:
                recent = page.evaluate("window.__thumbs.slice(-50)")  # about the last second
                now = drawing(np.asarray(recent[-1][1], np.float32))
                if drawing(np.asarray(recent[0][1], np.float32)) != now and page.inner_text("#live-caption") == now:
                    break
                assert time.time() < deadline, "no moment when the caption named the drawing on screen"
                page.wait_for_timeout(50)
            shot = Path(os.environ.get("FASTVLM_SCREENSHOTS") or tmp_path)
            shot.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot / "page-live.png"))
        finally:
            browser.close()
    finally:
        s.stop()
