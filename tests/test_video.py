"""Video files in every front-end: synthetic videos made here with PyAV, one known solid colour per second.

What reaches the engine is caught at the image-preprocessing boundary, so the colours and times checked are those
the model was given; answers of the batched per-frame path are compared with the same frames asked one at a time.
"""

import base64
import io
import json
import re

import numpy as np
import pytest
from conftest import FIXTURES, assert_clean_error, run_cli

av = pytest.importorskip("av", reason="video files need PyAV: pip install -e '.[video]' (CI installs it)")

from fastvlm_mlx import FastVLMError, generate, load  # noqa: E402
from fastvlm_mlx import video as video_module  # noqa: E402

MODEL = str(FIXTURES / "format_a")
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # one per second
FPS = 10
PROMPT = "Describe."  # the tiny fixture model's answers to it differ between these frames


def make_video(path, colours=COLOURS, fps=FPS, noise=False, **options):
    """An H.264 (or MPEG-4 Part 2) MP4 of 64x48 frames: each colour for one second (its left quarter in the
    complementary colour, which the tiny model tells apart better than a plain colour), or random noise."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for colour in colours:
            for _ in range(fps):
                if noise:
                    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                else:
                    pixels = np.full((48, 64, 3), colour)
                    pixels[:, :16] = 255 - np.array(colour)
                frame = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "colours.mp4")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A text file named .mp4, a video whose coded frames are overwritten with garbage, and two truncated videos:
    one cut before its index (written last), one whose index comes first and whose frames stop half way."""
    folder = tmp_path_factory.mktemp("bad")
    text = folder / "notes.mp4"
    text.write_text("these are my notes, not a video\n")
    data = bytearray(make_video(folder / "noise.mp4", noise=True).read_bytes())
    mdat = data.find(b"mdat")
    data[mdat + 2000 : mdat + 30000] = np.random.default_rng(1).integers(0, 256, 28000, dtype=np.uint8).tobytes()
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    whole = make_video(folder / "whole.mp4", noise=True).read_bytes()
    cut = folder / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    indexed = make_video(folder / "indexed.mp4", noise=True, movflags="faststart").read_bytes()
    cut_frames = folder / "cut_frames.mp4"
    cut_frames.write_bytes(indexed[: len(indexed) // 2])
    return {"text": text, "corrupt": corrupt, "truncated": cut, "truncated frames": cut_frames}


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


@pytest.fixture
def seen(monkeypatch):
    """Every image the engine preprocesses (as the model's pixels) and every prompt it prepares (as rendered)."""
    import fastvlm_mlx.image
    from fastvlm_mlx.engine import Engine

    caught = {"pixels": [], "prompts": []}
    preprocess, prepare = fastvlm_mlx.image.preprocess, Engine.prepare

    def recording_preprocess(image, size):
        pixels = preprocess(image, size)
        caught["pixels"].append(np.asarray(pixels)[0])
        return pixels

    def recording_prepare(self, messages, *args, **kwargs):
        caught["prompts"].append(self.processor.render(messages, *args, **kwargs)[0])
        return prepare(self, messages, *args, **kwargs)

    monkeypatch.setattr(fastvlm_mlx.image, "preprocess", recording_preprocess)
    monkeypatch.setattr(Engine, "prepare", recording_prepare)
    return caught


def centre_colour(pixels) -> tuple:
    """The colour at the middle of a frame, in 0..255 (preprocessed frames are padded to a square with black)."""
    h, w, _ = pixels.shape
    return tuple(np.rint(pixels[h // 2, w // 2] * 255).astype(int))


def assert_colour(pixels, expected):
    assert np.abs(np.array(centre_colour(pixels)) - np.array(expected)).max() <= 6, (centre_colour(pixels), expected)


def run_generate(capsys, *args, model=MODEL):
    """``python -m fastvlm_mlx.generate`` in this process: (exit status, stdout, stderr)."""
    from fastvlm_mlx.generate import main

    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(model), *[str(a) for a in args]])
    out = capsys.readouterr()
    return stopped.value.code, out.out, out.err


# ------------------------------------------------------------------------------------------ frames in one prompt
def test_frames_reach_the_engine_with_their_colours_and_times(clip, seen, capsys):
    code, out, err = run_generate(capsys, "--video", clip, "--frames", 4, "--prompt", PROMPT, "--max-tokens", 4)
    assert code == 0, err
    assert len(seen["pixels"]) == 4
    for pixels, colour in zip(seen["pixels"], COLOURS):  # the middle of each quarter: one frame of each second
        assert_colour(pixels, colour)
    (prompt,) = seen["prompts"]
    assert prompt.count("<image>") == 4
    assert "4 frames in order: frame 1 at 0.50 s, frame 2 at 1.50 s, frame 3 at 2.50 s, frame 4 at 3.50 s." in prompt
    assert prompt.index("frame 4 at 3.50 s") < prompt.index(PROMPT) > prompt.rindex("<image>")


def test_fps_samples_from_the_start_and_the_api_matches_the_command(clip, local, seen):
    frames = video_module.read_frames(clip, fps=2)
    assert [f.time for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    for frame, second in zip(frames, [0, 0, 1, 1, 2, 2, 3, 3]):
        assert_colour(np.asarray(frame.image) / 255.0, COLOURS[second])
    model, processor = local
    by_video = generate(model, processor, PROMPT, video=clip, fps=2, max_tokens=6)
    parts = video_module.video_parts(frames, 4.0) + [{"type": "text", "text": PROMPT}]
    by_hand = generate(model, processor, messages=[{"role": "user", "content": parts}], max_tokens=6)
    assert by_video == by_hand
    assert seen["prompts"][0] == seen["prompts"][1]


def test_each_time_takes_the_frame_shown_nearest_it(clip):
    """Frames every 0.1 s, the colour changing each second: the frame before a time is taken when it is nearer."""
    frames = list(video_module.iter_frames(clip, [0.94, 1.04, 1.96, 2.94, 9.0]))
    assert [f.time for f in frames] == pytest.approx([0.9, 1.0, 2.0, 2.9, 3.9])
    for frame, colour in zip(frames, [COLOURS[0], COLOURS[1], COLOURS[2], COLOURS[2], COLOURS[3]]):
        assert_colour(np.asarray(frame.image) / 255.0, colour)


def test_frames_that_cannot_fit_the_context_are_refused_before_decoding(clip, local, capsys, monkeypatch):
    model, processor = local  # a context of 512 positions, 16 per frame
    code, _, err = run_generate(capsys, "--video", clip, "--frames", 40, "--prompt", PROMPT)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    said = re.search(r"over the model's context of 512; at most (\d+) frames fit", err)
    assert said and str(clip) in err, err
    most = int(said.group(1))
    generate(model, processor, PROMPT, video=clip, frames=most, max_tokens=1)  # the most that fit does fit
    monkeypatch.setattr(video_module, "check_fits", lambda *a, **k: None)  # one more: the engine's own check
    with pytest.raises(FastVLMError, match="over the model's context"):
        generate(model, processor, PROMPT, video=clip, frames=most + 1, max_tokens=1)


# ------------------------------------------------------------------------------------------- one answer per frame
def test_every_second_writes_one_record_per_second_from_the_batched_decoder(clip, local, seen, capsys, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ("--video", clip, "--every", 1, "--prompt", PROMPT, "--max-tokens", 10, "--batch-size", 4)
    code, stdout, err = run_generate(capsys, *args, "--output", out)
    assert code == 0, err
    assert stdout == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["start"], r["end"], r["time"]) for r in records] == [
        (k, float(k), float(k + 1), float(k)) for k in range(4)
    ]
    for pixels, colour in zip(seen["pixels"], COLOURS):
        assert_colour(pixels, colour)
    model, processor = local  # the same frames asked one at a time, greedy
    alone = [
        generate(model, processor, PROMPT, image=f.image, max_tokens=10)
        for f in video_module.read_frames(clip, every=1)
    ]
    assert [r["text"] for r in records] == alone


def test_every_answers_equal_each_frame_asked_alone_by_the_demo_model(capsys, tmp_path):
    """The trained demo model tells its frames apart in every dtype (the random fixture may not, in float16)."""
    from test_demo import DEMO, make_demo
    from test_demo import MODEL as DEMO_MODEL

    video, out = DEMO / "shapes.mp4", tmp_path / "answers.jsonl"
    args = ("--video", video, "--every", 1, "--prompt", make_demo.QUESTION, "--batch-size", 4, "--output", out)
    code, _, err = run_generate(capsys, *args, model=DEMO_MODEL)
    assert code == 0, err
    model, processor = load(str(DEMO_MODEL))
    alone = [
        generate(model, processor, make_demo.QUESTION, image=f.image) for f in video_module.read_frames(video, every=1)
    ]
    assert len(set(alone)) == 4, alone
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == alone


def test_every_keeps_the_system_prompt(clip, local, capsys, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ("--video", clip, "--every", 2, "--prompt", PROMPT, "--max-tokens", 6, "--system", "Answer in French.")
    code, _, err = run_generate(capsys, *args, "--output", out)
    assert code == 0, err
    answers = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    model, processor = local
    frames = video_module.read_frames(clip, every=2)

    def alone(**system):
        return [generate(model, processor, PROMPT, image=f.image, max_tokens=6, **system) for f in frames]

    assert answers == alone(system="Answer in French.")
    assert answers != alone(), "the default system prompt gives the same answers: the check would prove little"


def parse_srt(text: str) -> list[tuple]:
    """A strict SubRip reader: numbered blocks from 1, a timing line, at least one line of text, a blank line."""
    cues = []
    for n, block in enumerate(text.split("\n\n")[:-1], 1):
        lines = block.split("\n")
        assert lines[0] == str(n), block
        timing = re.fullmatch(r"(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})", lines[1])
        assert timing and len(lines) >= 3 and all(line.strip() for line in lines[2:]), block
        values = [int(v) for v in timing.groups()]
        start = values[0] * 3600 + values[1] * 60 + values[2] + values[3] / 1000
        end = values[4] * 3600 + values[5] * 60 + values[6] + values[7] / 1000
        cues.append((start, end, "\n".join(lines[2:])))
    assert text.endswith("\n\n")
    return cues


def parse_vtt(text: str) -> list[tuple]:
    """A strict WebVTT reader: the WEBVTT header, then cues of a timing line and text, no '-->' in the text."""
    header, _, body = text.partition("\n\n")
    assert header == "WEBVTT"
    cues = []
    for block in body.split("\n\n")[:-1]:
        lines = block.split("\n")
        timing = re.fullmatch(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})", lines[0])
        assert timing and len(lines) >= 2 and all(line.strip() and "-->" not in line for line in lines[1:]), block
        values = [int(v) for v in timing.groups()]
        start = values[0] * 3600 + values[1] * 60 + values[2] + values[3] / 1000
        end = values[4] * 3600 + values[5] * 60 + values[6] + values[7] / 1000
        cues.append((start, end, "\n".join(lines[1:])))
    return cues


@pytest.mark.parametrize("kind", ["srt", "vtt"])
def test_every_second_as_subtitles(clip, capsys, kind):
    args = ("--video", clip, "--every", 1, "--prompt", PROMPT, "--max-tokens", 6)
    code, out, err = run_generate(capsys, *args, "--format", kind)
    assert code == 0, err
    cues = (parse_srt if kind == "srt" else parse_vtt)(out)
    assert [(start, end) for start, end, _ in cues] == [(k, k + 1) for k in range(4)]
    assert all(text for _, _, text in cues)


def test_subtitle_text_is_escaped():
    from fastvlm_mlx.generate import SubtitleWriter

    for kind, parse in (("srt", parse_srt), ("vtt", parse_vtt)):
        out = io.StringIO()
        writer = SubtitleWriter(out, kind)
        writer.write({"start": 0.0, "end": 1.5, "text": "a --> b\n\n<i>&"})
        writer.write({"start": 1.5, "end": 3.0, "text": "  "})  # no text: no cue
        writer.write({"start": 3661.25, "end": 3662.0, "text": "late"})
        cues = parse(out.getvalue())
        assert [(s, e) for s, e, _ in cues] == [(0.0, 1.5), (3661.25, 3662.0)]
        assert cues[0][2] == ("a -> b\n<i>&" if kind == "srt" else "a --&gt; b\n&lt;i&gt;&amp;")


# ----------------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "kind, words",
    [
        ("text", ["not a video (the file holds text)"]),
        ("corrupt", ["the video is corrupt or truncated at"]),
        ("truncated", ["not a video, or a corrupt or truncated one"]),
        ("truncated frames", ["the video is truncated: its frames stop at"]),
    ],
)
def test_bad_video_files_are_one_clear_line(bad_files, local, kind, words):
    """From the command (a process of its own, so that anything FFmpeg writes to stderr would show) and the API."""
    path = bad_files[kind]
    proc = run_cli("fastvlm_mlx.generate", "--model", MODEL, "--video", str(path), "--frames", "4", "-p", PROMPT)
    assert_clean_error(proc, f"error: {path}: ", *words)
    assert proc.returncode == 1 and proc.stdout == ""
    model, processor = local
    with pytest.raises(FastVLMError, match=re.escape(f"{path}: {words[0]}")):
        generate(model, processor, PROMPT, video=path, frames=4)


# -------------------------------------------------------------------------------------------------- chat, batch
def test_chat_attaches_a_video_to_the_next_message(clip, local, bad_files):
    from fastvlm_mlx import ChatSession
    from fastvlm_mlx.chat import ChatREPL

    model, processor = local
    out, err = io.StringIO(), io.StringIO()
    repl = ChatREPL(ChatSession(model, processor), {"max_tokens": 6}, out=out, err=err, frames=4)
    repl.handle(f"/video {bad_files['text']}")
    assert err.getvalue().startswith(f"error: {bad_files['text']}: not a video") and repl.video is None
    repl.handle(f"/video {clip}")
    repl.handle(PROMPT)
    assert out.getvalue() == generate(model, processor, PROMPT, video=clip, frames=4, max_tokens=6) + "\n"
    assert repl.video is None and len(repl.chat.messages) == 3  # system, the turn with its frames, the answer


def test_batch_rows_may_name_videos(clip, local, bad_files, tmp_path):
    from fastvlm_mlx.captioner import main

    rows = [
        {"id": "clip", "video": str(clip), "frames": 4, "prompt": PROMPT},
        {"id": "fps", "video": str(clip), "fps": 1, "prompt": PROMPT},
        {"id": "notes", "video": str(bad_files["text"]), "prompt": PROMPT},
    ]
    listing, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["--model", MODEL, "--input", str(listing), "--output", str(output), "--max-tokens", "6"])
    assert code == 1  # one input failed
    records = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    model, processor = local
    assert records["clip"]["text"] == generate(model, processor, PROMPT, video=clip, frames=4, max_tokens=6)
    assert records["fps"]["text"] == generate(model, processor, PROMPT, video=clip, fps=1, max_tokens=6)
    assert records["clip"]["frames"] == 4 and records["clip"]["video"] == str(clip)
    assert "not a video" in records["notes"]["error"]


# --------------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(clip):
    from test_server import Server

    s = Server("--allowed-image-dir", str(clip.parent), "--max-tokens-limit", "16")
    yield s
    s.stop()


def video_part(url, **sampling):
    return {"type": "video_url", "video_url": {"url": url, **sampling}}


def test_the_server_takes_video_url_parts(server, clip, local, bad_files):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    model, processor = local
    data = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()

    def ask(part):
        messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, part]}]
        return client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)

    answer = ask(video_part(data, frames=4)).choices[0].message.content
    assert answer == generate(model, processor, PROMPT, video=clip, frames=4, max_tokens=6)
    answer = ask(video_part(str(clip), fps=1)).choices[0].message.content
    assert answer == generate(model, processor, PROMPT, video=clip, fps=1, max_tokens=6)

    text = "data:video/mp4;base64," + base64.b64encode(bad_files["text"].read_bytes()).decode()
    for part, status, code, words in [
        (video_part(text), 400, "invalid_video", "not a video"),
        (video_part(data, frames=100), 400, "context_length_exceeded", "cannot fit the model's context"),
        (video_part(str(bad_files["corrupt"])), 403, "forbidden_path", "outside the allowed image directory"),
        (video_part(data, frames=2, fps=1), 400, None, "give frames or fps, not both"),
    ]:
        with pytest.raises(openai.APIStatusError) as failed:
            ask(part)
        error = failed.value.response.json()["error"]
        assert failed.value.status_code == status and error["code"] == code, error
        assert words in error["message"] and error["message"].startswith("messages[0].content[1]"), error


def test_the_responses_api_takes_input_video_parts(server, clip, local, bad_files):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    model, processor = local

    def ask(path, **sampling):
        data = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
        part = {"type": "input_video", "video_url": data, **sampling}
        content = [{"type": "input_text", "text": PROMPT}, part]
        return client.responses.create(
            model="m", input=[{"role": "user", "content": content}], max_output_tokens=6, temperature=0
        )

    expected = generate(model, processor, PROMPT, video=clip, frames=3, max_tokens=6)
    assert ask(clip, frames=3).output_text == expected
    with pytest.raises(openai.BadRequestError) as failed:
        ask(bad_files["text"])
    error = failed.value.response.json()["error"]
    assert error["param"] == "input" and error["code"] == "invalid_video", error
    assert error["message"].startswith("input[0].content[1]: not a video"), error
