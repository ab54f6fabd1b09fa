"""Where a request's images come from, and their limits: data URLs, http(s) URLs (off unless allowed; same-host
redirects only) and files under an allowed directory; every source capped in bytes, every image in pixels, and
checked before a pixel is decoded. Videos (``video_url``) come as data URLs or allowed files, their frames under the
same pixel limit. Errors are ``APIError`` 400s (403 outside the allowed directory)."""

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import urlparse

from .config import ServerConfig
from .protocol import APIError


def _open_checked(data: bytes, where: str, cfg: ServerConfig):
    """Decode image bytes, refusing oversized files and pixel counts before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    from ..image import register_heif, unreadable_reason

    register_heif()  # HEIC/HEIF through pillow-heif
    if len(data) > cfg.max_image_bytes:
        raise APIError(400, f"{where}: image is {len(data)} bytes, over the limit of {cfg.max_image_bytes}", "messages")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > cfg.max_image_pixels:
            raise APIError(
                400,
                f"{where}: image declares {width}x{height} pixels, over the limit of {cfg.max_image_pixels}",
                "messages",
                "image_too_large",
            )
        image.load()
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(
            400,
            f"{where}: image declares more pixels than the limit of {cfg.max_image_pixels} "
            "(a possible decompression bomb)",
            "messages",
            "image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise APIError(400, f"{where}: {unreadable_reason(data[:64])}", "messages", "invalid_image") from None
    except Exception as e:  # truncated and corrupt files raise many types
        raise APIError(
            400, f"{where}: image is truncated or corrupt ({type(e).__name__})", "messages", "invalid_image"
        ) from None
    return image


def _fetch_remote(url: str, where: str, cfg: ServerConfig) -> bytes:
    """GET with a timeout and a size cap; redirects are followed only within the same host."""
    import httpx

    host = urlparse(url).hostname
    with httpx.Client(timeout=cfg.remote_timeout_s, follow_redirects=False) as client:
        for _ in range(4):
            with client.stream("GET", url) as response:
                if response.is_redirect:
                    target = urlparse(str(response.next_request.url)) if response.next_request else None
                    if target is None or target.hostname != host:
                        raise APIError(400, f"{where}: redirect to another host refused", "messages")
                    url = str(response.next_request.url)
                    continue
                if response.status_code != 200:
                    raise APIError(400, f"{where}: fetching the image gave HTTP {response.status_code}", "messages")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > cfg.max_image_bytes:
                        raise APIError(
                            400, f"{where}: image is over the limit of {cfg.max_image_bytes} bytes", "messages"
                        )
                return bytes(data)
    raise APIError(400, f"{where}: too many redirects", "messages")


def load_image_url(url: str, where: str, cfg: ServerConfig):
    """An ``image_url`` part's URL -> a decoded PIL image."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: image_url needs a url", "messages")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise APIError(400, f"{where}: a data URL must be base64 (data:image/...;base64,...)", "messages")
        if len(payload) > cfg.max_image_bytes * 4 // 3 + 4:
            raise APIError(400, f"{where}: image is over the limit of {cfg.max_image_bytes} bytes", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the data URL", "messages") from None
        return _open_checked(data, where, cfg)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        if not cfg.allow_remote_images:
            raise APIError(
                400, f"{where}: remote image URLs are off (start the server with --allow-remote-images)", "messages"
            )
        try:
            return _open_checked(_fetch_remote(url, where, cfg), where, cfg)
        except APIError:
            raise
        except Exception as e:  # network errors
            raise APIError(400, f"{where}: could not fetch the image ({type(e).__name__})", "messages") from None
    target = _allowed_file(url, where, cfg, "image")
    if target.stat().st_size > cfg.max_image_bytes:
        raise APIError(400, f"{where}: image is over the limit of {cfg.max_image_bytes} bytes", "messages")
    return _open_checked(target.read_bytes(), where, cfg)


def _allowed_file(url: str, where: str, cfg: ServerConfig, what: str) -> Path:
    """A path (or file:// URL) that lies under ``--allowed-image-dir`` (a 403 outside it) and is a file."""
    path = url[len("file://") :] if urlparse(url).scheme == "file" else url
    if cfg.allowed_image_dir is None:
        raise APIError(
            400, f"{where}: local {what} files are off (start the server with --allowed-image-dir DIR)", "messages"
        )
    root = Path(cfg.allowed_image_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise APIError(403, f"{where}: {path} is outside the allowed image directory", "messages", "forbidden_path")
    if not target.is_file():
        raise APIError(400, f"{where}: no such {what} file {path}", "messages")
    return target


def load_video_url(
    url: str, where: str, cfg: ServerConfig, frames: int | None = None, fps: float | None = None, max_frames=None
) -> list[dict]:
    """A video's URL (a data URL within the body limit, or a file under ``--allowed-image-dir``) -> its sampled
    frames' image parts (``frames`` evenly spread, 8 by default, or ``fps`` a second), then a text part of their
    times (``fastvlm_mlx.video``).  Frames face the image pixel limit; more frames than ``max_frames`` (what the
    model's context could hold) are refused before any is decoded."""
    from ..errors import FastVLMError
    from ..video import read_video, video_parts

    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise APIError(400, f"{where}: a data URL must be base64 (data:video/...;base64,...)", "messages")
        try:
            source = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the data URL", "messages") from None
    elif urlparse(url).scheme in ("http", "https"):
        raise APIError(400, f"{where}: a video_url must be a data URL or an allowed file, not a remote URL", "messages")
    else:
        source = str(_allowed_file(url, where, cfg, "video"))

    def refuse_over(info, count: int) -> None:
        if max_frames is not None and count > max_frames:
            raise APIError(
                400,
                f"{where}: {count} frames cannot fit the model's context (at most {max_frames}); "
                "ask for fewer (frames, or a lower fps)",
                "messages",
                "context_length_exceeded",
            )

    try:
        info, picked = read_video(source, frames, fps, cfg.max_image_pixels, refuse_over)
        return video_parts(picked, info.duration)
    except FastVLMError as e:
        message = str(e).removeprefix("video bytes: ")
        raise APIError(400, f"{where}: {message}", "messages", "invalid_video") from None
