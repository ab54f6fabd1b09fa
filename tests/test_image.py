"""fastvlm_mlx.image: Apple's FastVLM preprocessing, every PIL mode, and one-line errors for bad input."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.image import load_image, pad_to_square, preprocess, to_rgb

S = 48
ORIENTATION = 0x0112


def as_numpy(x):
    return np.array(x.astype(mx.float32))


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def asymmetric_rgb(width=64, height=40):
    """Smooth gradients plus a red block in the top-left corner: any rotation or flip changes it a lot."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    pixels[: height // 4, : width // 4] = (255, 0, 0)
    return Image.fromarray(pixels.astype(np.uint8))


def check_output(out, size=S):
    assert out.shape == (1, size, size, 3)
    assert out.dtype == mx.float32
    values = as_numpy(out)
    assert values.min() >= 0.0 and values.max() <= 1.0
    return values[0]


# ---- colour modes and shapes -------------------------------------------------------------------------


def mode_images():
    rgb = asymmetric_rgb()
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return {
        "L.png": (rgb.convert("L"), {}),
        "LA.png": (rgb.convert("LA"), {}),
        "RGBA.png": (rgba, {}),
        "P.png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), {}),
        "CMYK.jpg": (rgb.convert("CMYK"), {"quality": 95}),
        "1.png": (rgb.convert("1"), {}),
        "I16.png": (Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), {}),
        "pixel.png": (Image.new("RGB", (1, 1), (10, 200, 30)), {}),
        "panorama.png": (Image.new("RGB", (3000, 20), (255, 255, 255)), {}),
        "tall.png": (Image.new("RGB", (20, 3000), (255, 255, 255)), {}),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_modes_and_shapes(tmp_path, name):
    image, kwargs = mode_images()[name]
    path = save(tmp_path, image, name, **kwargs)
    values = check_output(preprocess(path, S))
    assert values.max() > 0.0  # something of the image survived


def test_rgba_alpha_is_dropped_like_apple():
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., :3] = (200, 100, 50)  # fully transparent, but the colour is kept (Apple's convert("RGB"))
    values = check_output(preprocess(pixels, 4), 4)
    np.testing.assert_allclose(values[0, 0] * 255, (200, 100, 50), atol=1e-3)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = save(tmp_path, Image.fromarray(np.full((8, 8), 40000, np.uint16)), "deep.png")
    assert Image.open(path).mode.startswith("I")
    values = check_output(preprocess(path, 8), 8)
    np.testing.assert_allclose(values * 255, 40000 >> 8, atol=1e-3)


def test_float_and_int32_modes():
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))))[0, 0, 0] == 128
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 100.0, np.float32))))[0, 0, 0] == 100
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0x1234, np.int32))))[0, 0, 0] == 0x12


# ---- padding and the reference pipeline --------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(41, 20), (20, 41)])
def test_padding_is_black_and_centred(width, height):
    white = Image.new("RGB", (width, height), (255, 255, 255))
    side = max(width, height)
    values = check_output(preprocess(white, side), side)  # no resize: exact pixels
    lead = (side - min(width, height)) // 2  # 10 above/left, 11 below/right
    band = values if width > height else values.transpose(1, 0, 2)
    assert (band[:lead] == 0).all()
    assert (band[lead : lead + 20] == 1).all()
    assert (band[lead + 20 :] == 0).all()
    assert band.shape[0] - lead - 20 == 11


def test_padding_after_resize():
    values = check_output(preprocess(Image.new("RGB", (300, 100), "white"), S))
    assert (values[0] == 0).all() and (values[-1] == 0).all()  # top and bottom rows black
    assert (values[S // 2] == 1).all()  # middle row white from edge to edge


def test_pad_to_square_keeps_square_images():
    image = Image.new("RGB", (5, 5))
    assert pad_to_square(image) is image


def reference_preprocess(image, size):
    """Written independently: expand2square with numpy slicing, PIL bicubic, /255."""
    pixels = np.asarray(image.convert("RGB"))
    h, w, _ = pixels.shape
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = pixels
    resized = Image.fromarray(square).resize((size, size), resample=Image.BICUBIC)
    return np.asarray(resized).astype(np.float32) / 255.0


@pytest.mark.parametrize("width,height,size", [(64, 40, 48), (37, 90, 64), (333, 200, 100)])
def test_matches_reference(width, height, size):
    image = asymmetric_rgb(width, height)
    ours = check_output(preprocess(image, size), size)
    np.testing.assert_allclose(ours, reference_preprocess(image, size), rtol=0, atol=1e-6)


# ---- EXIF orientation --------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation,transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_png_exact(tmp_path, orientation, transpose):
    image = asymmetric_rgb()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    tagged = save(tmp_path, image, "tagged.png", exif=exif)
    upright = save(tmp_path, image.transpose(transpose), "upright.png")
    assert Image.open(tagged).getexif()[ORIENTATION] == orientation
    np.testing.assert_array_equal(as_numpy(preprocess(tagged, S)), as_numpy(preprocess(upright, S)))
    # ...and ignoring the tag would give something very different.
    assert np.abs(as_numpy(preprocess(image, S)) - as_numpy(preprocess(upright, S))).mean() > 0.05


@pytest.mark.parametrize("orientation,transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_jpeg(tmp_path, orientation, transpose):
    image = asymmetric_rgb(128, 64)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    tagged = save(tmp_path, image, "tagged.jpg", exif=exif, quality=100)
    upright = save(tmp_path, image.transpose(transpose), "upright.jpg", quality=100)
    difference = np.abs(as_numpy(preprocess(tagged, S)) - as_numpy(preprocess(upright, S)))
    assert difference.mean() < 0.01 and difference.max() < 0.1  # JPEG blocks differ; a wrong rotation is ~0.2+
    assert np.abs(as_numpy(preprocess(image, S)) - as_numpy(preprocess(upright, S))).mean() > 0.05


# ---- accepted source types ---------------------------------------------------------------------------


def test_source_types_agree(tmp_path):
    image = asymmetric_rgb()
    path = save(tmp_path, image, "same.png")
    expected = as_numpy(preprocess(image, S))
    pixels = np.asarray(image)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), pixels):
        np.testing.assert_array_equal(as_numpy(preprocess(source, S)), expected)
    np.testing.assert_array_equal(as_numpy(preprocess(pixels.astype(np.float32) / 255.0, S)), expected)
    rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(as_numpy(preprocess(rgba, S)), expected)


def test_grayscale_arrays():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for source in (gray, gray[:, :, None]):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (4, 3)
        np.testing.assert_array_equal(np.asarray(image)[:, :, 1], gray)


# ---- bad input ---------------------------------------------------------------------------------------


def error_for(source, size=S):
    with pytest.raises(FastVLMError) as info:
        preprocess(source, size)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message.lower()


def test_missing_file(tmp_path):
    message = error_for(tmp_path / "nope.jpg")
    assert "nope.jpg" in message and "no such file" in message


def test_directory(tmp_path):
    message = error_for(str(tmp_path))
    assert str(tmp_path).lower() in message and "directory" in message


def test_not_an_image(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    message = error_for(path)
    assert "noise.jpg" in message and "not an image" in message
    assert "image bytes" in error_for(path.read_bytes())


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated(tmp_path, suffix):
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    path = save(tmp_path, Image.fromarray(noise), f"cut.{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = error_for(path)
    assert f"cut.{suffix}" in message and "truncated" in message


@pytest.mark.parametrize("pixels", [40 * 40, 100 * 100])  # 1.6x the limit (PIL only warns) and 10x (PIL raises)
def test_decompression_bomb(tmp_path, monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    side = int(pixels**0.5)
    path = save(tmp_path, Image.new("RGB", (side, side)), "bomb.png")
    filters_before = list(warnings.filters)
    message = error_for(path)
    assert "bomb.png" in message and "decompression bomb" in message
    assert warnings.filters == filters_before  # the process-wide warning filters are untouched


@pytest.mark.parametrize(
    "array,word",
    [
        (np.zeros(3, np.uint8), "shape"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.array([[object()]], dtype=object), "dtype"),
        (np.zeros((4, 4), np.int64), "dtype"),
        (np.full((4, 4), 2.0), "[0, 1]"),
        (np.full((4, 4), np.nan), "nan"),
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
    ],
)
def test_bad_arrays(array, word):
    message = error_for(array)
    assert "array" in message and word in message


def test_zero_size_pil_image():
    assert "zero size" in error_for(Image.new("RGB", (0, 0)))


def test_unsupported_source_and_size():
    assert "expected a path" in error_for(12345)
    for size in (0, -3, 2.5, True):
        assert "size" in error_for(np.zeros((4, 4), np.uint8), size)
