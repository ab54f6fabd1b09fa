"""HEIC/HEIF photos (and AVIF where Pillow has it) wherever an image is accepted: the API, the batch captioner's
folder scan, the server's data URLs, and a one-line error naming the install when pillow-heif is missing.

The fixture HEIC is encoded at test time by pillow-heif from the committed test photo; the reference for its
pixels is pillow-heif's own decoder called directly, not through PIL's opener that fastvlm_mlx registers.
"""

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, ROOT, assert_clean_error, run_cli

from fastvlm_mlx import generate, load
from fastvlm_mlx.image import load_image, preprocess

pillow_heif = pytest.importorskip("pillow_heif", reason="HEIC needs pillow-heif: pip install -e '.[heif]'")

MODEL = str(FIXTURES / "format_a")


def write_heic(source, path, quality=90):
    from PIL import Image

    pillow_heif.from_pillow(Image.open(source).convert("RGB")).save(str(path), quality=quality)
    return path


def decoded_by_pillow_heif(path) -> np.ndarray:
    """The HEIC's pixels as pillow-heif decodes them on its own: an HxWx3 uint8 array."""
    return np.asarray(pillow_heif.open_heif(str(path), convert_hdr_to_8bit=True))


@pytest.fixture(scope="module")
def heic(tmp_path_factory):
    return write_heic(PHOTO, tmp_path_factory.mktemp("heic") / "photo.heic")


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


def test_heic_gives_the_pixels_pillow_heif_decodes(heic):
    reference = decoded_by_pillow_heif(heic)
    assert reference.shape == (140, 200, 3) and reference.dtype == np.uint8
    # a lossy encode of the test photo: close to the PNG it was made from, so the decode is a real one
    original = np.asarray(load_image(PHOTO), dtype=np.int16)
    assert np.abs(reference.astype(np.int16) - original).mean() < 6
    assert np.array_equal(np.asarray(load_image(heic)), reference)
    for size in (64, 257):  # padded to a square, then bicubic down and up
        expected = np.array(preprocess(reference, size))
        for source in (heic, str(heic), heic.read_bytes()):
            assert np.array_equal(np.array(preprocess(source, size)), expected)


def test_heic_follows_its_exif_orientation_like_a_jpeg(tmp_path):
    """An iPhone photo taken sideways: the HEIC and a JPEG with the same EXIF orientation come out the same way up."""
    from PIL import Image

    from fastvlm_mlx.image import register_heif

    register_heif()
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255  # white left half
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image.save(tmp_path / "turned.heic", quality=95, exif=exif.tobytes())
    image.save(tmp_path / "turned.jpg", quality=95, exif=exif.tobytes())
    heic, jpeg = (np.asarray(load_image(tmp_path / n), dtype=np.int16) for n in ("turned.heic", "turned.jpg"))
    assert heic.shape == jpeg.shape == (80, 40, 3)
    assert heic[:30].mean() > 200 and heic[50:].mean() < 50  # white on top after the turn
    assert np.abs(heic - jpeg).mean() < 8


def test_batch_captions_a_folder_that_holds_a_heic(tmp_path, local):
    model, processor = local
    folder = tmp_path / "iphone"
    folder.mkdir()
    (folder / "a.png").write_bytes(PHOTO2.read_bytes())
    write_heic(PHOTO, folder / "IMG_0001.HEIC")
    out = tmp_path / "captions.jsonl"
    proc = run_cli(
        "fastvlm_mlx.batch",
        "--model",
        MODEL,
        "--input",
        str(folder),
        "--output",
        str(out),
        "--max-tokens",
        "8",
        "--batch-size",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(got) == {str(folder / "a.png"), str(folder / "IMG_0001.HEIC")}
    reference = decoded_by_pillow_heif(folder / "IMG_0001.HEIC")
    expected = generate(model, processor, "Describe the image.", image=reference, max_tokens=8)
    assert got[str(folder / "IMG_0001.HEIC")]["text"] == expected
    assert "error" not in got[str(folder / "a.png")]


def test_server_reads_a_heic_data_url(heic, local):
    from test_server import KEY, Server, httpx

    model, processor = local
    url = "data:image/heic;base64," + base64.b64encode(heic.read_bytes()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        "max_tokens": 6,
        "temperature": 0,
    }
    server = Server("--api-key", KEY)
    try:
        response = httpx.post(
            server.url + "/v1/chat/completions", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
        )
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    expected = generate(model, processor, "Describe the image.", image=decoded_by_pillow_heif(heic), max_tokens=6)
    assert response.json()["choices"][0]["message"]["content"] == expected


# Runs a module as `python -m` would, in an interpreter where `import pillow_heif` fails.
WITHOUT_PILLOW_HEIF = (
    "import runpy, sys; sys.modules['pillow_heif'] = None; runpy.run_module(sys.argv.pop(1), run_name='__main__')"
)


def test_without_pillow_heif_a_heic_is_one_line_naming_the_install(heic):
    proc = run_cli("fastvlm_mlx.generate", "--model", MODEL, "--image", str(heic), "--prompt", "Hi.")
    assert proc.returncode == 0, proc.stderr  # the same command with pillow-heif installed
    args = [
        sys.executable,
        "-c",
        WITHOUT_PILLOW_HEIF,
        "fastvlm_mlx.generate",
        "--model",
        MODEL,
        "--image",
        str(heic),
        "--prompt",
        "Hi.",
        "--max-tokens",
        "4",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert_clean_error(proc, "photo.heic", 'pip install "fastvlm-mlx[heif]"', "pillow-heif")


def test_avif_where_pillow_reads_it(tmp_path):
    from PIL import Image, features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec (the wheels of Pillow 11.2 and later have it)")
    Image.open(PHOTO).convert("RGB").save(tmp_path / "photo.avif", quality=90)
    with Image.open(tmp_path / "photo.avif") as reference:  # Pillow's own AVIF decoder
        expected = np.array(preprocess(np.asarray(reference.convert("RGB")), 64))
    assert np.array_equal(np.array(preprocess(tmp_path / "photo.avif", 64)), expected)
    assert (
        np.abs(
            np.asarray(load_image(tmp_path / "photo.avif"), dtype=np.int16)
            - np.asarray(load_image(PHOTO), dtype=np.int16)
        ).mean()
        < 6
    )
