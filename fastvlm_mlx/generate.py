"""``python -m fastvlm_mlx.generate``: ask FastVLM about one or more images, streaming the answer to stdout.

With ``--schema FILE``, ``--regex`` or ``--choices`` the answer matches it; one cut short by ``--max-tokens``
is printed as far as it got, then an error (exit status 1), since it does not match.

``--video FILE`` asks about a video: ``--frames N`` (8 by default) or ``--fps F`` of its frames go into the one
prompt, with their times.  ``--every SECONDS`` instead answers the prompt once per frame, one frame at the start of
every SECONDS, all through the batched decoder (as ``batch`` does), written in time order as JSONL records with
their start and end times, or as SRT or WebVTT subtitles (``--format``), to stdout or ``--output FILE``."""

import json
import os
import sys
import types

from .engine import GenerationResponse, stream_generate
from .errors import FastVLMError, exit_on_user_error
from .processor import DEFAULT_SYSTEM
from .video import DEFAULT_FRAMES


def _stats_line(r: GenerationResponse) -> str:
    return (
        f"vision {r.vision_ms:.1f} ms | TTFT {r.ttft_ms:.1f} ms | "
        f"prompt {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory {r.peak_memory:.2f} GB"
    )


def main(argv: list[str] | None = None) -> int:
    import typer

    from .cli import (
        adapter_path_option,
        connect_timeout_option,
        dtype_option,
        image_argument,
        model_option,
        parallel_option,
        run_ranked,
        sampling_options,
        structured_options,
        use_one_line_warnings,
    )

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Answer a prompt about an image (or a text-only prompt) with FastVLM.")
    @exit_on_user_error
    @structured_options
    @sampling_options
    def run(
        prompt: str = typer.Option(..., "--prompt", "-p", help="What to ask."),
        image: list[str] | None = typer.Option(
            None,
            "--image",
            "-i",
            help="Image file or http(s) URL; repeat for several images, omit for a text-only prompt.",
        ),
        model_path: str = model_option(),
        dtype: str | None = dtype_option(),
        adapter_path: str | None = adapter_path_option(),
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt ('' for none)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Print timing and memory to stderr."),
        vision_backend: str = typer.Option(
            "mlx", "--vision-backend", help="mlx, or coreml (macOS: the model directory's fastvithd.mlpackage)."
        ),
        video: str | None = typer.Option(
            None, "--video", help="Video file: its frames go into the prompt (--frames, --fps) or one by one (--every)."
        ),
        frames: int | None = typer.Option(
            None, "--frames", help=f"With --video: this many frames, evenly spread (default {DEFAULT_FRAMES})."
        ),
        fps: float | None = typer.Option(None, "--fps", help="With --video: this many frames a second."),
        every: float | None = typer.Option(
            None, "--every", help="With --video: one answer per frame, a frame every SECONDS (see --format)."
        ),
        output_format: str = typer.Option("jsonl", "--format", help="With --every: jsonl, srt or vtt."),
        output: str | None = typer.Option(None, "--output", "-o", help="With --every: write to FILE, not stdout."),
        batch_size: int = typer.Option(8, "--batch-size", help="With --every: frames decoded together."),
        parallel: str = parallel_option(),
        connect_timeout: float = connect_timeout_option(),
        sampling: dict = None,
        constraint=None,
    ):
        images = [image_argument(i) for i in image or []]  # a bad image fails before the model loads
        video_options = dict(frames=frames, fps=fps, every=every, output=output, batch_size=batch_size)
        _check_video_options(video, images, output_format, **video_options)
        if every is not None:
            lead = lambda engine: _answer_frames(  # noqa: E731
                engine, video, every, prompt, system, sampling, batch_size, constraint, output_format, output
            )
        else:
            lead = lambda engine: _answer(  # noqa: E731
                engine.model,
                engine.processor,
                prompt,
                images,
                system,
                verbose,
                sampling,
                constraint,
                video,
                frames,
                fps,
            )
        run_ranked(
            lead,
            model_path,
            parallel,
            connect_timeout,
            dtype=dtype,
            vision_backend=vision_backend,
            adapter_path=adapter_path,
        )

    app(args=argv)
    return 0


def _check_video_options(video, images, output_format, frames, fps, every, output, batch_size) -> None:
    """Refuse video flags that do not go together, and a bad video file, before the model loads."""
    from .video import probe

    given = {"--frames": frames, "--fps": fps, "--every": every}
    if video is None:
        stray = [flag for flag, value in {**given, "--output": output}.items() if value is not None]
        if stray or output_format != "jsonl":
            raise FastVLMError(f"{(stray or ['--format'])[0]} needs --video")
        return
    named = [flag for flag, value in given.items() if value is not None]
    if len(named) > 1:
        raise FastVLMError(f"give one of --frames, --fps and --every, not {' and '.join(named)}")
    if every is None and (output is not None or output_format != "jsonl"):
        raise FastVLMError("--format and --output are for --every (one answer per frame)")
    if every is not None and images:
        raise FastVLMError("--every answers about each frame alone: leave out --image")
    if output_format not in SUBTITLE_FORMATS:
        raise FastVLMError(f"--format must be one of {', '.join(SUBTITLE_FORMATS)} (got {output_format!r})")
    if batch_size < 1:
        raise FastVLMError(f"--batch-size must be at least 1 (got {batch_size})")
    probe(os.path.expanduser(video))


def _answer(
    model, processor, prompt, image, system, verbose, sampling, constraint=None, video=None, frames=None, fps=None
) -> None:
    from .cli import cut_short

    last = None
    for last in stream_generate(
        model,
        processor,
        prompt,
        image or None,
        system=system or None,
        response_format=constraint,
        video=os.path.expanduser(video) if video is not None else None,
        frames=frames,
        fps=fps,
        **sampling,
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and last is not None:
        print(_stats_line(last), file=sys.stderr)
    if constraint is not None and last is not None and last.finish_reason == "length":
        raise FastVLMError(cut_short(constraint, sampling["max_tokens"], last.generation_tokens))


# ------------------------------------------------------------------------------ one answer per frame
SUBTITLE_FORMATS = ("jsonl", "srt", "vtt")


def _answer_frames(
    engine, video, every, prompt, system, sampling, batch_size, constraint, output_format, output
) -> None:
    """``--every``: the frame at the start of each ``every`` seconds answered alone, the frames batched through
    the captioner's decoder (``captioner.caption``), the answers written in time order as they complete."""
    from .captioner import caption
    from .video import iter_frames, probe, sample_times

    video = os.path.expanduser(video)
    info = probe(video)
    starts = sample_times(info.duration, every=every)
    times, failed = {}, []

    def items():
        try:
            for k, frame in enumerate(iter_frames(video, starts)):
                times[k] = frame.time
                yield {"id": k, "image": frame.image, "prompt": prompt}
        except FastVLMError as e:  # ends the input; raised once the frames before it are answered
            failed.append(e)

    try:
        out = open(os.path.expanduser(output), "w", encoding="utf-8") if output else sys.stdout
    except OSError as e:
        raise FastVLMError(f"{output}: cannot write the answers ({e.strerror or e})") from None
    cues = SubtitleWriter(out, output_format)
    finished, errors = {}, []

    def write(record: dict) -> None:
        finished[record["id"]] = record
        while cues.written in finished:
            k = cues.written
            record = finished.pop(k)
            start, end = starts[k], min(starts[k] + every, info.duration)
            entry = {"index": k, "start": round(start, 3), "end": round(end, 3), "time": round(times[k], 3)}
            entry.update((key, value) for key, value in record.items() if key not in ("id", "image", "prompt"))
            if "error" in entry:
                errors.append(f"frame at {start:g} s: {entry['error']}")
            cues.write(entry)

    try:
        caption(engine, items(), sampling, batch_size, write, constraint, system)
    finally:
        if output:
            out.close()
    if failed:
        raise failed[0]
    if errors:
        raise FastVLMError(f"{len(errors)} of {len(starts)} frames have no answer; the first: {errors[0]}")


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    return f"{hours:02d}:{minutes:02d}:{ms // 1000:02d}{decimal}{ms % 1000:03d}"


class SubtitleWriter:
    """Per-frame answers as JSONL records, SRT cues or WebVTT cues, one at a time in time order; an answer with
    no text (or an error) is a JSONL record but no cue."""

    def __init__(self, out, output_format: str):
        self.out, self.format, self.written, self.cues = out, output_format, 0, 0
        if output_format == "vtt":
            out.write("WEBVTT\n\n")

    def write(self, entry: dict) -> None:
        self.written += 1
        if self.format == "jsonl":
            self.out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        else:
            lines = [line.strip() for line in entry.get("text", "").splitlines() if line.strip()]
            if not lines:
                self.out.flush()
                return
            self.cues += 1
            if self.format == "srt":
                timing = f"{_clock(entry['start'], ',')} --> {_clock(entry['end'], ',')}"
                text = "\n".join(line.replace("-->", "->") for line in lines)
                self.out.write(f"{self.cues}\n{timing}\n{text}\n\n")
            else:  # WebVTT: the cue text is escaped as the format asks
                timing = f"{_clock(entry['start'], '.')} --> {_clock(entry['end'], '.')}"
                text = "\n".join(line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for line in lines)
                self.out.write(f"{timing}\n{text}\n\n")
        self.out.flush()


class _CommandAndFunction(types.ModuleType):
    """``fastvlm_mlx.generate`` names both the API function and this command's module, and importing the module
    (as the ``fastvlm-generate`` script does) rebinds the package's attribute to it: calling the module calls
    the function, so ``from fastvlm_mlx import generate`` works either way."""

    def __call__(self, *args, **kwargs):
        from .engine import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CommandAndFunction

if __name__ == "__main__":
    sys.exit(main())
