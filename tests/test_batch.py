"""The batch captioner on a folder with bad files, resumed after SIGKILL and after a torn last line."""

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, ROOT, run_cli

from fastvlm_mlx import generate, load

MODEL = str(FIXTURES / "format_a")


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


def bomb_png(width=30000, height=30000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    shutil.copy(PHOTO, d / "a.png")
    shutil.copy(PHOTO2, d / "sub" / "b.png")
    from PIL import Image

    Image.open(PHOTO).convert("RGB").save(d / "c.jpg", quality=90)
    (d / "corrupt.png").write_bytes(b"this is not a picture")
    (d / "truncated.jpg").write_bytes((d / "c.jpg").read_bytes()[:600])
    (d / "bomb.png").write_bytes(bomb_png())
    (d / "notes.txt").write_text("not an image extension: ignored")
    return d


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_with_bad_files(folder, tmp_path, local):
    model, processor = local
    out = tmp_path / "out.jsonl"
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
    assert proc.returncode == 1, proc.stderr
    assert "3 input(s) with errors" in proc.stderr and "Traceback" not in proc.stderr
    got = {r["id"]: r for r in records(out)}
    assert set(got) == {
        str(folder / n) for n in ("a.png", "sub/b.png", "c.jpg", "corrupt.png", "truncated.jpg", "bomb.png")
    }
    for name in ("a.png", "sub/b.png", "c.jpg"):
        r = got[str(folder / name)]
        assert r["text"] == generate(model, processor, "Describe the image.", image=folder / name, max_tokens=8), name
        assert r["finish_reason"] in ("stop", "length") and r["prompt_tokens"] == 72 and r["generation_tokens"] <= 8
    assert "not an image" in got[str(folder / "corrupt.png")]["error"]
    assert "truncated" in got[str(folder / "truncated.jpg")]["error"]
    assert "decompression bomb" in got[str(folder / "bomb.png")]["error"]
    # a re-run has nothing left to do and keeps the file as it is
    before = out.read_text()
    again = run_cli("fastvlm_mlx.batch", "--model", MODEL, "--input", str(folder), "--output", str(out))
    assert again.returncode == 1 and out.read_text() == before and "6 already" in again.stderr


def test_jsonl_input_with_own_prompts_and_exit_0(tmp_path, local):
    model, processor = local
    rows = [{"id": "x", "image": str(PHOTO), "prompt": "What colour is it?"}, {"id": "y", "image": str(PHOTO2)}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(out), "--prompt", "Describe.", "--max-tokens", "6"
    )
    assert proc.returncode == 0, proc.stderr
    got = {r["id"]: r for r in records(out)}
    assert got["x"]["text"] == generate(model, processor, "What colour is it?", image=PHOTO, max_tokens=6)
    assert got["y"]["prompt"] == "Describe."


def test_killed_run_resumes_with_every_id_once(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": str(i), "image": str(PHOTO if i % 2 else PHOTO2)}) + "\n" for i in range(40))
    )
    reference = tmp_path / "reference.jsonl"
    assert (
        run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(reference), "--max-tokens", "12").returncode
        == 0
    )
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(out), "--max-tokens", "12"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    partial = out.read_text().count("\n")
    assert 8 <= partial < 40
    with open(out, "a") as f:
        f.write('{"id": "torn", "text": "half a rec')  # as if power failed mid-write
    assert (
        run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(out), "--max-tokens", "12").returncode == 0
    )
    lines = out.read_text().splitlines()
    got = [json.loads(line) for line in lines]  # every line valid JSON
    assert sorted(r["id"] for r in got) == sorted(str(i) for i in range(40))  # every id exactly once
    expected = {r["id"]: r["text"] for r in records(reference)}
    assert {r["id"]: r["text"] for r in got} == expected


def test_bad_arguments_are_one_line(tmp_path):
    proc = run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "o.jsonl"))
    assert (
        proc.returncode == 1 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    )
