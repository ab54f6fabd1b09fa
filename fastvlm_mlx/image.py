"""Image loading and preprocessing, matching Apple's FastVLM reference pipeline.

Apple's predict.py opens the image, converts it to RGB, pads it to a centred black square (llava's
`expand2square`; FastVLM's image mean is 0, so the fill is black), and lets CLIPImageProcessor resize
it with PIL bicubic and rescale by 1/255 (mean 0, std 1: no normalisation).  We do the same, plus two
things a user expects that the reference skips: EXIF orientation is applied, and 16-bit images are
scaled down to 8 bits instead of being clipped.

Every problem with an input is raised as FastVLMError with a one-line message naming the input.

iPhone photos are HEIC: PIL reads HEIC and HEIF through pillow-heif (a dependency on macOS, the `heif` extra
elsewhere), whose opener is registered the first time an image is decoded.  AVIF is read by Pillow itself
where its build has AVIF (the wheels of Pillow 11.2 and later).
"""

import functools
import io
import os
import warnings
from pathlib import Path
from struct import error as struct_error  # raised by some PIL decoders on corrupt headers

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FastVLMError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}

# ISO base media file brands (the `ftyp` box) of HEIF images, HEIC ones included, and of AVIF images.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2"}
_AVIF_BRANDS = {b"avif", b"avis"}

HEIF_INSTALL = 'pip install "fastvlm-mlx[heif]" (or pip install pillow-heif)'


@functools.cache
def register_heif() -> bool:
    """Let PIL open HEIC and HEIF files through pillow-heif, once per process; False where it is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def container_format(head: bytes):
    """HEIF or AVIF for the first bytes of an ISO base media image file (by its `ftyp` brands), else None."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return None
    end = min(int.from_bytes(head[:4], "big"), len(head))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:  # an AVIF file lists mif1 too
        return "AVIF"
    return "HEIF" if brands & _HEIF_BRANDS else None


def unreadable_reason(head: bytes) -> str:
    """Why PIL could not identify an image file, from its first bytes: a missing decoder, or not an image."""
    kind = container_format(head)
    if kind == "HEIF" and not register_heif():
        return f"a HEIC/HEIF image needs pillow-heif: {HEIF_INSTALL}"
    if kind == "AVIF":
        from PIL import features

        if not features.check("avif"):
            return (
                "an AVIF image needs a Pillow built with AVIF (the wheels of Pillow 11.2 and later): "
                "pip install -U pillow"
            )
    return "not an image, or an image format PIL cannot read"


def _one_line(text):
    return " ".join(str(text).split())


def _fail(name, problem):
    return FastVLMError(_one_line(f"{name}: {problem}"))


def to_rgb(image):
    """Convert any PIL mode to 8-bit RGB.

    Alpha is dropped, not composited, exactly as Apple's `.convert("RGB")` does.  PIL's own conversion
    clips wider-than-8-bit modes, which turns most 16-bit images white, so those are scaled instead:
    - I;16*: value >> 8 (the top 8 bits);
    - I (32-bit int): negatives clip to 0; if the maximum is above 255 the values are taken as 16-bit
      (>> 8), or scaled by the maximum when it exceeds 65535;
    - F (float): taken as [0, 1] if the maximum is <= 1, else as [0, 255]; clipped to that range.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        gray = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, None)
        top = int(values.max()) if values.size else 0
        if top > 65535:
            values = values * 255 // top
        elif top > 255:
            values = values >> 8
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency ... should be converted to RGBA": we drop alpha on purpose.
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def pad_to_square(image, fill=(0, 0, 0)):
    """Centre the image on a square canvas of its longer side (llava's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _open_decoded(fileobj, name):
    """Open and fully decode, so that truncated files fail here rather than inside resize."""
    register_heif()
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; a user-facing tool should refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(fileobj)
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            problem = f"refusing a possible decompression bomb: more than {Image.MAX_IMAGE_PIXELS} pixels"
            raise _fail(name, f"{problem} (PIL.Image.MAX_IMAGE_PIXELS)") from None
        except UnidentifiedImageError:
            fileobj.seek(0)
            raise _fail(name, unreadable_reason(fileobj.read(64))) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct_error) as exc:
            raise _fail(name, f"image is truncated or corrupt ({exc})") from None
    return image


def _from_path(path):
    name = str(path)
    if not os.path.exists(path):
        raise _fail(name, "no such file")
    if os.path.isdir(path):
        raise _fail(name, "is a directory, not an image file")
    try:
        with open(path, "rb") as handle:
            return _open_decoded(handle, name)
    except PermissionError:
        raise _fail(name, "permission denied") from None
    except FastVLMError:
        raise
    except OSError as exc:
        raise _fail(name, f"cannot read file ({exc.strerror or exc})") from None


def _from_array(array):
    name = "array"
    if array.dtype == np.uint8:
        data = array
    elif array.dtype.kind == "f":
        if array.size and not np.isfinite(array).all():
            raise _fail(name, "image array contains NaN or infinity")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise _fail(name, f"float image array must be in [0, 1], got [{array.min():g}, {array.max():g}]")
        data = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise _fail(name, f"unsupported image array dtype {array.dtype} (expected uint8, or float in [0, 1])")
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[2] in (3, 4))):
        raise _fail(name, f"bad image array shape {array.shape} (expected HxW or HxWx1, HxWx3, HxWx4)")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise _fail(name, f"image array has zero size {array.shape}")
    return Image.fromarray(np.ascontiguousarray(data))


def load_image(source):
    """Return `source` as an 8-bit RGB PIL image, upright according to its EXIF orientation.

    `source` may be a path (str or pathlib.Path), the bytes of an image file, a PIL image, or a
    numpy array (HxW, HxWx1, HxWx3 or HxWx4; uint8, or float in [0, 1]).
    """
    if isinstance(source, (str, Path)):
        image, name = _from_path(source), str(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image, name = _open_decoded(io.BytesIO(bytes(source)), "image bytes"), "image bytes"
    elif isinstance(source, Image.Image):
        image, name = source, "image"
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _fail(name, f"image is truncated or corrupt ({exc})") from None
    elif isinstance(source, np.ndarray):
        image, name = _from_array(source), "array"
    else:
        raise _fail("image", f"expected a path, bytes, PIL image or numpy array, got {type(source).__name__}")

    if image.width == 0 or image.height == 0:
        raise _fail(name, f"image has zero size {image.width}x{image.height}")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not make a readable image unusable
        pass
    try:
        return to_rgb(image)
    except (ValueError, OSError) as exc:
        raise _fail(name, f"cannot convert colour mode {image.mode} to RGB ({exc})") from None


def preprocess(image, size):
    """Load, pad to a centred black square and bicubic-resize to size x size.

    Returns a (1, size, size, 3) float32 NHWC array in [0, 1], as the vision tower expects.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise FastVLMError(f"image size must be a positive integer, got {size!r}")
    square = pad_to_square(load_image(image))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    # float64 * (1/255) then float32: the same rounding as CLIPImageProcessor's rescale.
    pixels = (np.asarray(square, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
    return mx.array(pixels[None])
