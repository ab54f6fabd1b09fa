"""Video files as frames for the model: decoded with PyAV (whose wheels bundle FFmpeg), sampled by time.

A video reaches the model as images: ``frames=N`` takes N frames spread evenly over the video (the middle of N
equal parts), ``fps=F`` takes F frames a second from the start, ``every=S`` one frame at the start of every S
seconds.  The stream is decoded in order and each sampled time takes the frame shown nearest to it, which holds
for variable frame rates and needs no seeking.  Frames are PIL images that go through the engine's image path
like any other image; they face the same pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, or the server's).

In one prompt the frames become one user message: the frames as images, then a line giving each frame's time,
then the prompt (Apple's template puts a message's images before its text).  ``video_turn`` refuses, before
decoding, a number of frames that cannot fit the model's context.

Every problem with a file is a ``FastVLMError`` naming it: not a video, corrupt or truncated, no video stream.
"""

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ContextLengthError, FastVLMError

DEFAULT_FRAMES = 8
VIDEO_INSTALL = 'pip install "fastvlm-mlx[video]" (or pip install av)'


@dataclass
class Frame:
    """One sampled frame: its presentation time in seconds from the start of the video, and its pixels."""

    time: float
    image: object  # PIL.Image.Image, RGB


@dataclass
class VideoInfo:
    name: str
    duration: float  # seconds
    width: int
    height: int


def _av():
    try:
        import av
    except ImportError:
        raise FastVLMError(f"reading video files needs PyAV: {VIDEO_INSTALL}") from None
    return av


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "video bytes"


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a character cut by the end of the sample
    return True


def _open(source, name: str):
    """The opened container and its first video stream; a file FFmpeg cannot read is a FastVLMError."""
    av = _av()
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FastVLMError(f"{name}: no such file")
        if path.is_dir():
            raise FastVLMError(f"{name}: is a directory, not a video file")
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise FastVLMError(f"{name}: cannot read file ({e.strerror or e})") from None
        target = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        head, target = bytes(source[:512]), io.BytesIO(bytes(source))
    else:
        raise FastVLMError(f"video: expected a path or bytes, got {type(source).__name__}")
    if not head:
        raise FastVLMError(f"{name}: the file is empty")
    if _looks_like_text(head):
        raise FastVLMError(f"{name}: not a video (the file holds text)")
    try:
        container = av.open(target, "r")
    except av.FFmpegError as e:
        raise FastVLMError(f"{name}: not a video, or a corrupt or truncated one ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise FastVLMError(f"{name}: the file has no video stream")
    return container, container.streams.video[0]


def _reason(error) -> str:
    return getattr(error, "strerror", None) or str(error)


def _seconds(value, time_base) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _start_and_duration(container, stream) -> tuple[float, float | None]:
    start = _seconds(stream.start_time, stream.time_base)
    if start is None:
        start = container.start_time / 1e6 if container.start_time is not None else 0.0
    duration = _seconds(stream.duration, stream.time_base)
    if not duration and container.duration:
        duration = container.duration / 1e6
    return start, duration or None


def probe(source, max_pixels: int | None = None) -> VideoInfo:
    """Open ``source`` (a path or the bytes of a file) and check it: a video stream, frames within the pixel
    limit, a duration (read from the stream's packets when the header has none)."""
    name = _name(source)
    container, stream = _open(source, name)
    try:
        _check_pixels(stream, name, max_pixels)
        start, duration = _start_and_duration(container, stream)
        if duration is None:
            duration = _duration_from_packets(container, stream, start, name)
        return VideoInfo(name, duration, stream.codec_context.width, stream.codec_context.height)
    finally:
        container.close()


def _check_pixels(stream, name: str, max_pixels: int | None) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = stream.codec_context.width, stream.codec_context.height
    if limit and width * height > limit:
        raise FastVLMError(f"{name}: frames of {width}x{height} pixels, over the limit of {limit} pixels per image")


def _duration_from_packets(container, stream, start: float, name: str) -> float:
    end = None
    try:
        for packet in container.demux(stream):
            if packet.pts is not None:
                t = _seconds(packet.pts + (packet.duration or 0), packet.time_base)
                end = t if end is None else max(end, t)
    except _av().FFmpegError as e:
        raise FastVLMError(f"{name}: the video is corrupt or truncated ({_reason(e)})") from None
    if end is None:
        raise FastVLMError(f"{name}: the video has no frames")
    return max(end - start, 0.0)


def sample_times(duration: float, frames: int | None = None, fps: float | None = None, every: float | None = None):
    """The times (seconds) to take frames at: ``frames`` evenly spread (each the middle of its equal part),
    ``fps`` a second from 0, or one at the start of every ``every`` seconds.  Exactly one is given."""
    given = [n for n, v in (("frames", frames), ("fps", fps), ("every", every)) if v is not None]
    if len(given) != 1:
        raise FastVLMError(f"give one of frames, fps and every (got {', '.join(given) or 'none'})")
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise FastVLMError(f"frames must be a whole number of at least 1 (got {frames!r})")
        return [(i + 0.5) * duration / frames for i in range(frames)]
    step_name, step = ("fps", 1 / fps) if fps is not None else ("every", every)
    value = fps if fps is not None else every
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise FastVLMError(f"{step_name} must be a number above 0 (got {value!r})")
    count = max(1, math.ceil(duration / step - 1e-9))
    return [i * step for i in range(count)]


def iter_frames(source, times, max_pixels: int | None = None) -> Iterator[Frame]:
    """The frame shown nearest each of ``times`` (sorted, seconds from the start), in order, decoding the
    stream once from the start; a time past the last frame takes the last frame.  A frame at the same time as
    the previous one is given again (the caller may drop it).  Decoding errors are FastVLMErrors naming the file
    and the time."""
    av = _av()
    name = _name(source)
    container, stream = _open(source, name)
    try:
        _check_pixels(stream, name, max_pixels)
        stream.thread_type = "AUTO"
        start, _ = _start_and_duration(container, stream)
        times = list(times)
        wanted, previous, count, t = 0, None, 0, 0.0
        try:
            for frame in container.decode(stream):
                if frame.time is not None:
                    t = frame.time - start
                elif count:  # no timestamp: one frame period after the last
                    t += 1 / float(stream.average_rate or 25)
                count += 1
                current = (t, frame)
                while wanted < len(times) and t >= times[wanted]:
                    nearest = previous if previous and times[wanted] - previous[0] < t - times[wanted] else current
                    yield Frame(max(nearest[0], 0.0), _picture(nearest[1], name))
                    wanted += 1
                if wanted == len(times):
                    return
                previous = current
        except av.FFmpegError as e:
            raise FastVLMError(f"{name}: the video is corrupt or truncated at {t:.2f} s ({_reason(e)})") from None
        if previous is None:
            raise FastVLMError(f"{name}: no frame could be decoded")
        declared = _seconds(stream.duration, stream.time_base)  # the video stream's own, not the container's
        period = 1 / float(stream.average_rate) if stream.average_rate else 0.0
        if declared and declared - previous[0] > 2 * period + 0.1:
            raise FastVLMError(
                f"{name}: the video is truncated: its frames stop at {seconds_text(previous[0])} s "
                f"of the {seconds_text(declared)} s it declares"
            )
        for _ in times[wanted:]:
            yield Frame(max(previous[0], 0.0), _picture(previous[1], name))
    finally:
        container.close()


def _picture(frame, name: str):
    """A decoded frame as an upright RGB PIL image (the stream's display rotation applied, as EXIF for photos)."""
    from PIL import Image

    if frame.width == 0 or frame.height == 0:
        raise FastVLMError(f"{name}: a frame has zero size {frame.width}x{frame.height}")
    image = frame.to_image()
    degrees = round(getattr(frame, "rotation", 0) or 0) % 360  # counter-clockwise, as PIL's rotate turns
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}.get(
        degrees
    )
    return image.transpose(turn) if turn is not None else image


def read_frames(
    source, frames: int | None = None, fps: float | None = None, every: float | None = None, max_pixels=None
) -> list[Frame]:
    """The frames of a video file (path or bytes) sampled by ``frames``, ``fps`` or ``every`` (see
    ``sample_times``; ``frames=8`` when none is given).  With ``frames`` or ``fps``, a frame picked twice (more
    samples than the video has frames) is kept once."""
    if every is not None:
        info = probe(source, max_pixels)
        return list(iter_frames(source, sample_times(info.duration, every=every), max_pixels))
    return read_video(source, frames, fps, max_pixels)[1]


def read_video(
    source, frames: int | None = None, fps: float | None = None, max_pixels: int | None = None, check=None
) -> tuple[VideoInfo, list[Frame]]:
    """The video's facts and its frames for one prompt (``frames``, 8 by default, or ``fps``), each frame once;
    ``check(info, count)`` may refuse the number of frames before any is decoded."""
    if frames is None and fps is None:
        frames = DEFAULT_FRAMES
    info = probe(source, max_pixels)
    times = sample_times(info.duration, frames, fps)
    if check is not None:
        check(info, len(times))
    return info, _distinct(list(iter_frames(source, times, max_pixels)))


def _distinct(frames: list[Frame]) -> list[Frame]:
    kept: list[Frame] = []
    for frame in frames:
        if not kept or frame.time != kept[-1].time:
            kept.append(frame)
    return kept


def seconds_text(t: float) -> str:
    """A time in seconds to the hundredth, always two decimals ("0.50"), so that a prompt's length does not hang
    on the exact times of the frames (``check_fits`` counts it before they are decoded)."""
    return f"{t:.2f}"


def timestamps_text(frames: list[Frame], duration: float) -> str:
    """The line that tells the model when each frame was taken."""
    times = ", ".join(f"frame {i} at {seconds_text(f.time)} s" for i, f in enumerate(frames, 1))
    return f"Video of {seconds_text(duration)} s, {len(frames)} frames in order: {times}.\n"


def video_parts(frames: list[Frame], duration: float) -> list[dict]:
    """The frames as message parts: one image part each, then the timestamps as a text part."""
    return [{"type": "image", "image": f.image} for f in frames] + [
        {"type": "text", "text": timestamps_text(frames, duration)}
    ]


def video_turn(
    prompt: str,
    source,
    frames: int | None = None,
    fps: float | None = None,
    engine=None,
    images=None,
    history=(),
    system=None,
    max_pixels: int | None = None,
) -> dict:
    """One user message: ``images`` (if any), the video's sampled frames, the frames' times, then ``prompt``.

    With ``engine``, frames that cannot fit the model's context after ``history`` (earlier messages) and the
    ``system`` prompt are refused before any frame is decoded."""
    from .processor import one_turn

    one_turn(prompt)  # an empty prompt is refused before the video is read
    extra = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]

    def fits(info: VideoInfo, count: int) -> None:
        if engine is not None:
            check_fits(engine, info, count, prompt, len(extra), history, system)

    info, picked = read_video(source, frames, fps, max_pixels, fits)
    parts = [{"type": "image", "image": im} for im in extra] + video_parts(picked, info.duration)
    return {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}


def check_fits(engine, info: VideoInfo, count: int, prompt: str, images: int = 0, history=(), system=None) -> None:
    """Refuse ``count`` frames of ``info`` that leave no room to generate in the model's context, saying how many
    would fit."""
    context = engine.processor.context_length

    def positions(n: int) -> int:
        stand_ins = [Frame(t, 0) for t in sample_times(info.duration, frames=n)] if n else []
        parts = [{"type": "image", "image": 0}] * images + video_parts(stand_ins, info.duration)
        turn = {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}
        return engine.positions([*history, turn], system)

    needed = positions(count)
    if needed < context:
        return
    low, high = 0, count  # the most frames that fit: positions(low) < context <= positions(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if positions(middle) < context else (low, middle)
    fit = f"at most {low} frames fit" if low and positions(low) < context else "not even one frame fits"
    raise ContextLengthError(
        f"{info.name}: {count} frames take {needed} positions of the prompt "
        f"({engine.model.config.num_image_tokens} each, with the text), over the model's context of {context}; "
        f"{fit}"
    )
