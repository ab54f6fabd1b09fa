"""Live camera benchmark: the web page's live mode in Chromium, its fake camera, our server, one model.

    python -m benchmarks.live                   # full-size 0.5B, random weights, 1024 px, 20 answers
    python -m benchmarks.live --smoke           # the tiny fixture checkpoint, seconds

The checkpoint is ``benchmarks.server``'s random-weight one with ``benchmarks.structured``'s byte-level tokenizer of
Qwen2's size (so that every token the random weights pick shows as text, as a real model's would).  The camera is
Chromium's fake device playing a synthetic video (solid colours, a new one every second, a square whose shade
changes every frame, so no two frames are the same picture; shading and a sensor's grain, so that the frames
compress as a camera's do) at 1280x720, which the page scales to the model's
resolution.  The page runs as a user runs it: one request in flight, the newest frame at send time, its own
``max_tokens``.  Each answer the page announces (its "answer" event) carries the time from frame capture to the
first token written on screen; the page stops itself after the last one, so no request is left half done.

Figures, after ``--warmup`` answers:
  ttft_ms            capture -> first token on screen, in the browser (median, p90)
  answers_per_s      answers finished per second, in steady state
  server_ttft_ms     the server's ``timings.ttft_ms``: from its receipt of the request to the first token (median)
  model_ms           the model's part of it: ``timings.vision_ms + timings.prompt_ms``, the image encode and the
                     prefill (median)
  outside_fraction   per answer, (browser TTFT - model_ms) / browser TTFT, averaged: capture, scaling, JPEG
                     encoding, upload, the picture's decoding, queueing, the stream back and the page's update; the
                     target is under 0.10
  outside_receipt_fraction  the same with the server's whole TTFT in place of model_ms: what happens before the
                     server has the request and after it sends the token

A camera never shows the same picture twice, but the fake camera's video loops: the server runs with no prompt
cache (``--prompt-cache-mb 0``), or a repeated frame would be answered from memory and flatter the figures.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# what the benchmark adds to the page: count the answers, hand them over, and press Stop after the last one
# (inside the event, before the page sends anything more)
LISTEN = """() => {
  window.__live = { n: 0, target: 0 };
  document.getElementById('live-view').addEventListener('answer', (e) => {
    __answer(e.detail);
    if (++window.__live.n === window.__live.target) document.querySelector('#live-view .live-start').click();
  });
}"""


def write_y4m(path: Path, colours, seconds_each: int = 1, fps: int = 10, size=(320, 240), texture: bool = False):
    """A YUV4MPEG2 file (what Chromium's fake camera plays, looping at its end): each colour for ``seconds_each``,
    4:2:0, BT.601 full-range, with a small grey square in a corner whose shade changes with every frame.
    ``texture`` adds what a camera sees, so that its frames compress as a camera's do: shading (a sum of random
    waves, a new one with each colour) and a sensor's grain (new in every frame).  An item of ``colours`` may
    instead be a picture (an h x w x 3 RGB array of the frame's size), written as it is, without the square."""
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        n = 0
        for item in colours:
            if np.ndim(item) == 3:
                planes = yuv420(np.asarray(item), (w, h))
                for _ in range(seconds_each * fps):
                    f.write(b"FRAME\n" + planes)
                continue
            r, g, b = item
            y = 0.299 * r + 0.587 * g + 0.114 * b
            u = min(255, round(128 - 0.168736 * r - 0.331264 * g + 0.5 * b))
            v = min(255, round(128 + 0.5 * r - 0.418688 * g - 0.081312 * b))
            shading = np.zeros((h, w), np.float32)
            if texture:
                for _ in range(12):
                    fx, fy = rng.uniform(-0.08, 0.08, 2)
                    shading += 12 * np.sin(fx * xx + fy * yy + rng.uniform(0, 6.3))
            for _ in range(seconds_each * fps):
                grain = rng.normal(0, 4, (h, w)) if texture else 0
                luma = np.clip(np.round(y + shading + grain), 0, 255).astype(np.uint8)
                luma[: h // 8, : w // 8] = 40 + (n * 37) % 176  # a new picture every frame, same dominant colour
                n += 1
                f.write(b"FRAME\n" + luma.tobytes())
                f.write(np.full((h // 2, w // 2), u, np.uint8).tobytes())
                f.write(np.full((h // 2, w // 2), v, np.uint8).tobytes())
    return path


def yuv420(picture: np.ndarray, size) -> bytes:
    """An RGB picture as one y4m frame's planes: 4:2:0 (chroma averaged over 2x2 pixels), BT.601 full-range."""
    w, h = size
    if picture.shape != (h, w, 3):
        raise ValueError(f"a picture of {picture.shape}, not the frame's {(h, w, 3)}")
    r, g, b = np.moveaxis(picture.astype(np.float32), 2, 0)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    v = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    u, v = (c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v))
    return b"".join(np.clip(np.round(p), 0, 255).astype(np.uint8).tobytes() for p in (y, u, v))


CHROMIUM_HINT = "apt-get install chromium; on a Mac, Google Chrome or: playwright install chromium"
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


BROWSERS = (  # Chromium from the distribution, then a Mac's Chrome or Chromium
    "chromium",
    "chromium-browser",
    "google-chrome",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
)


def find_chromium() -> str | None:
    """A Chromium to drive: the system's, else the one ``playwright install chromium`` downloaded, else None."""
    for name in BROWSERS:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            path = pw.chromium.executable_path
        return path if Path(path).is_file() else None
    except Exception:  # no Playwright, or no browser of its own
        return None


def chromium() -> str:
    path = find_chromium()
    if path is None:
        raise SystemExit(f"error: the live benchmark needs Chromium ({CHROMIUM_HINT})")
    return path


def gauge(port: int, name: str) -> float:
    import httpx

    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"fastvlm_{name} "):
            return float(line.split()[1])
    raise RuntimeError(f"no {name} in /metrics")


def run_answers(page, answers: list, n: int, timeout: float) -> None:
    """Start the camera, wait for ``n`` answers (the page stops itself after the last)."""
    page.evaluate("(target) => { window.__live = { n: 0, target }; }", n)
    answers.clear()
    page.get_by_role("button", name="Start camera").click()
    deadline = time.time() + timeout
    while len(answers) < n:
        status = page.locator("#status").inner_text()
        if status.startswith("Error"):
            raise RuntimeError(f"the page says: {status}")
        if time.time() > deadline:
            raise RuntimeError(f"{len(answers)} of {n} answers within {timeout:g} s")
        page.wait_for_timeout(200)
    page.locator("#live-view .live-start[aria-pressed=false]").wait_for(timeout=10_000)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def measure(port: int, video: Path, answers_wanted: int, warmup: int, timeout: float) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium(),
            headless=True,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={video}",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            answers = []
            page.expose_function("__answer", lambda detail: answers.append(detail))
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.locator("#live-view .live-start").wait_for(state="attached", timeout=60_000)
            page.get_by_role("button", name="Live camera").click()
            page.evaluate(LISTEN)
            if warmup:
                run_answers(page, answers, warmup, timeout)
            run_answers(page, answers, answers_wanted, timeout)
        finally:
            browser.close()
    done = [a for a in answers if a["ttft_ms"] is not None]
    ttft = [a["ttft_ms"] for a in done]
    ends = sorted(a["captured_at"] + a["total_ms"] for a in answers)
    timed = [a for a in done if a["server_ttft_ms"] is not None]
    model = [a["server_vision_ms"] + a["server_prompt_ms"] for a in timed]

    def fraction(inside):
        return round(statistics.mean(1 - x / a["ttft_ms"] for x, a in zip(inside, timed)), 4) if timed else None

    return dict(
        answers=len(answers),
        answers_with_text=len(done),
        ttft_ms=dict(median=round(statistics.median(ttft), 1), p90=round(percentile(ttft, 0.9), 1)),
        answers_per_s=round((len(ends) - 1) * 1000 / (ends[-1] - ends[0]), 4) if len(ends) > 1 else None,
        capture_ms=round(statistics.median(a["capture_ms"] for a in answers), 2),
        image_kb=round(statistics.median(a["image_bytes"] for a in answers) / 1024, 1),
        server_ttft_ms=round(statistics.median(a["server_ttft_ms"] for a in timed), 1) if timed else None,
        model_ms=round(statistics.median(model), 1) if timed else None,
        outside_fraction=fraction(model),
        outside_receipt_fraction=fraction([a["server_ttft_ms"] for a in timed]),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="0.5B", choices=["0.5B", "1.5B", "7B"])
    p.add_argument("--checkpoint", type=Path, default=None, help="where the random-weight checkpoint is kept")
    p.add_argument("--answers", type=int, default=20, help="live answers measured")
    p.add_argument("--warmup", type=int, default=2, help="live answers first, not measured")
    p.add_argument("--camera", default="1280x720", help="the fake camera's frame size")
    p.add_argument("--fps", type=int, default=5, help="the fake camera's frame rate")
    p.add_argument("--image-cache-mb", type=float, default=8, help="the server's image-feature cache bound")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each run of answers")
    p.add_argument("--smoke", action="store_true", help="the tiny fixture checkpoint, a small camera")
    a = p.parse_args(argv)
    if a.answers < 2:
        p.error("--answers must be at least 2")
    from .server import start

    if a.smoke:
        model, a.camera = ROOT / "tests" / "fixtures" / "format_a", "320x240"
    else:
        from .server import make_checkpoint
        from .structured import synthetic_tokenizer

        base = make_checkpoint(a.checkpoint or Path(f"/tmp/fastvlm-bench-{a.model_size}"), a.model_size)
        model = synthetic_tokenizer(base, base.with_name(base.name + "-qwen2-vocab"))
    width, height = (int(x) for x in a.camera.split("x"))
    header = dict(
        benchmark="fastvlm-live",
        date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        command=" ".join(["python -m benchmarks.live"] + (argv if argv is not None else sys.argv[1:])),
        machine=dict(cores=os.cpu_count(), load_before=[round(x, 2) for x in os.getloadavg()]),
        checkpoint=str(model),
        camera=dict(width=width, height=height, fps=a.fps),
        image_cache_mb=a.image_cache_mb,
    )
    print(json.dumps(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="fastvlm-live-") as tmp:
        video = write_y4m(Path(tmp) / "camera.y4m", COLOURS, fps=a.fps, size=(width, height), texture=True)
        proc, port = start("ours", model, 1, ["--image-cache-mb", str(a.image_cache_mb), "--prompt-cache-mb", "0"])
        try:
            result = measure(port, video, a.answers, a.warmup, a.timeout)
            result["image_cache_bytes"] = int(gauge(port, "image_cache_bytes"))
            result["image_cache_bound_bytes"] = int(a.image_cache_mb * (1 << 20))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = dict(system="ours", **result, load_after=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(result), flush=True)
    print(
        f"capture -> first token on screen: median {result['ttft_ms']['median']:.0f} ms, "
        f"p90 {result['ttft_ms']['p90']:.0f} ms; {result['answers_per_s']} answers/s; "
        f"the model's part {result['model_ms']} ms; outside the model {result['outside_fraction']}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
