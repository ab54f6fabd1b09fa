"""The command lines as a user meets them: one set of sampling flags, Ctrl-C, bad paths and busy ports,
the context's end, warnings and progress bars, ``python -m fastvlm_mlx``.  CPU, float32 (the fixture)."""

import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, ROOT, assert_clean_error, run_cli

from fastvlm_mlx import ChatSession, generate, load, stream_generate
from fastvlm_mlx.engine import Sampling

MODEL = str(FIXTURES / "format_a")
CONTEXT = 512  # the fixture's max_position_embeddings
COMMANDS = ("generate", "chat", "server", "batch", "lora", "convert", "fuse", "eval")


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- commands and flags
def test_python_m_fastvlm_mlx_lists_every_command_and_runs_them():
    proc = run_cli("fastvlm_mlx")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    proc = run_cli("fastvlm_mlx", "generate", "--help")
    assert proc.returncode == 0 and "--max-tokens" in proc.stdout and "fastvlm_mlx.generate" in proc.stdout
    assert_clean_error(run_cli("fastvlm_mlx", "frobnicate"), "unknown command", "frobnicate")


def test_every_command_has_a_console_script():
    import importlib

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in COMMANDS:
        module, _, function = scripts[f"fastvlm-{name}"].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def _click_command(module_name, monkeypatch):
    """The click command a front-end's main() builds (captured instead of run)."""
    import importlib

    import typer

    built = []
    monkeypatch.setattr(typer.Typer, "__call__", lambda self, *a, **k: built.append(self))
    importlib.import_module(module_name).main([])
    return typer.main.get_command(built[0])


def test_the_sampling_flags_are_the_same_in_every_front_end(monkeypatch):
    from fastvlm_mlx.cli import SAMPLING_FLAGS

    names = list(SAMPLING_FLAGS)
    assert names == ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"]
    defaults = {n: getattr(Sampling(), n) for n in names}
    seen = {}
    for module in ("fastvlm_mlx.generate", "fastvlm_mlx.chat", "fastvlm_mlx.batch", "fastvlm_mlx.server"):
        params = {p.name: p for p in _click_command(module, monkeypatch).params}
        seen[module] = {n: (tuple(params[n].opts), params[n].default, params[n].help) for n in names}
        assert {n: params[n].default for n in names} == defaults, module
    first = next(iter(seen.values()))
    assert all(flags == first for flags in seen.values())
    assert first["temperature"][0] == ("--temperature", "--temp") and first["max_tokens"][0] == ("--max-tokens",)


def test_sampling_flags_reach_the_engine(local):
    model, processor = local
    proc = run_cli(
        "fastvlm_mlx.generate",
        "-m",
        MODEL,
        "-i",
        str(PHOTO),
        "-p",
        "Describe the image.",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "40",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "7",
    )
    assert proc.returncode == 0, proc.stderr
    expected = generate(
        model,
        processor,
        "Describe the image.",
        image=PHOTO,
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        top_k=40,
        min_p=0.01,
        repetition_penalty=1.2,
        seed=7,
    )
    greedy = generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=12)
    assert proc.stdout == expected + "\n" and expected != greedy


def test_out_of_range_sampling_flags_are_one_line():
    for flag, value in (("--top-p", "1.5"), ("--temperature", "-1"), ("--max-tokens", "0"), ("--top-k", "-2")):
        proc = run_cli("fastvlm_mlx.generate", "-m", MODEL, "-p", "hi", flag, value)
        assert_clean_error(proc, flag)


def test_server_request_defaults_come_from_sampling():
    from fastvlm_mlx.cli import sampling_defaults
    from fastvlm_mlx.server import ServerConfig, parse_request

    body = {"messages": [{"role": "user", "content": "hi"}]}
    free = dict(constraint=None)  # no response_format: no grammar
    assert parse_request(body, ServerConfig(model="m")).sampling == dict(sampling_defaults(), **free)
    cfg = ServerConfig(model="m", max_tokens_limit=100, sampling=dict(sampling_defaults(), temperature=0.5, seed=3))
    got = parse_request(dict(body, max_tokens=1000, top_k=5), cfg).sampling
    assert got == dict(sampling_defaults(), temperature=0.5, seed=3, top_k=5, max_tokens=100, **free)


# -------------------------------------------------------------------------- the context's end
def test_generation_stops_at_the_context(local):
    model, processor = local
    with pytest.warns(UserWarning, match="context of 512"):
        responses = list(stream_generate(model, processor, "Hello there.", max_tokens=100_000))
    room = CONTEXT - responses[-1].prompt_tokens
    assert responses[-1].finish_reason == "length" and responses[-1].generation_tokens == room
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly the room asked for: no warning
        exact = list(stream_generate(model, processor, "Hello there.", max_tokens=room))
    assert [r.token for r in exact] == [r.token for r in responses]
    # the CLI says so in one line, as every warning of ours: no file, line number or source line
    proc = run_cli("fastvlm_mlx.generate", "-m", MODEL, "-p", "Hello there.", "--max-tokens", "100000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(r.text for r in responses) + "\n"
    assert proc.stderr.splitlines() == [
        f"warning: the answer stopped at the model's context of 512 positions (the prompt took "
        f"{responses[-1].prompt_tokens}; max_tokens was 100000)"
    ]


def test_batch_stops_at_the_context(tmp_path, local):
    prompt = "Hello there. " * 60  # a long prompt, after which the fixture's answer runs on to the context's end
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "long", "image": str(PHOTO), "prompt": prompt}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(out), "--max-tokens", "100000")
    assert proc.returncode == 0, proc.stderr
    (record,) = records(out)
    assert record["finish_reason"] == "length" and record["generation_tokens"] == CONTEXT - record["prompt_tokens"]
    model, processor = local
    room = CONTEXT - record["prompt_tokens"]
    assert record["text"] == generate(model, processor, prompt, image=PHOTO, max_tokens=room)


# ------------------------------------------------------------------------------------- chat
def _repl(local, **kw):
    from fastvlm_mlx.chat import ChatREPL

    model, processor = local
    out, err = io.StringIO(), io.StringIO()
    return ChatREPL(ChatSession(model, processor), dict(max_tokens=6, **kw), out=out, err=err), out, err


def test_chat_save_to_an_unwritable_path_keeps_the_conversation(tmp_path, local):
    repl, out, err = _repl(local)
    repl.handle("Hello there.")
    before = list(repl.chat.messages)
    (tmp_path / "a-file").write_text("not a folder")
    assert repl.handle(f"/save {tmp_path / 'a-file' / 'conversation'}")
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "could not write the conversation" in lines[0]
    assert repl.chat.messages == before
    repl.handle("And then?")
    assert len(repl.chat.messages) == len(before) + 2


def test_chat_save_then_load_by_the_same_name(tmp_path, local, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    repl, out, err = _repl(local)
    repl.handle("Hello there.")
    messages = list(repl.chat.messages)
    repl.handle("/save ~/talk")
    assert (tmp_path / "talk.safetensors").is_file()
    repl.handle("/reset")
    repl.handle("/load ~/talk")
    assert repl.chat.messages == messages and "error" not in err.getvalue()
    repl.handle(f"/load {tmp_path / 'talk.safetensors'}")  # the full name works as well
    assert repl.chat.messages == messages and "error" not in err.getvalue()


def test_chat_image_path_expands_the_home_directory(tmp_path, local, monkeypatch):
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(PHOTO, tmp_path / "photo.png")
    repl, out, err = _repl(local)
    repl.handle("/image ~/photo.png")
    assert err.getvalue() == "" and repl.images == [str(tmp_path / "photo.png")]
    repl.handle("Describe the image.")
    model, processor = local
    assert out.getvalue() == generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=6) + "\n"


class _InterruptingOutput(io.StringIO):
    """A terminal whose user presses Ctrl-C after the answer's ``after``-th piece appears (a real SIGINT)."""

    def __init__(self, after):
        super().__init__()
        self.after = after

    def write(self, text):
        self.after -= 1
        if self.after == 0:
            signal.raise_signal(signal.SIGINT)
        return super().write(text)


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(local):
    model, processor = local
    from fastvlm_mlx.chat import ChatREPL

    chat = ChatSession(model, processor)
    out, err = _InterruptingOutput(after=3), io.StringIO()
    repl = ChatREPL(chat, dict(max_tokens=40), out=out, err=err)
    assert repl.handle(f"/image {PHOTO}") and repl.handle("Describe the image.")
    assert "(stopped)" in err.getvalue()
    full = generate(model, processor, "Describe the image.", image=PHOTO, max_tokens=40)
    partial = chat.messages[-1]["content"]
    assert chat.messages[-1]["role"] == "assistant" and 0 < len(partial) < len(full) and full.startswith(partial)
    assert repl.images == []
    repl.handle("And the box?")  # the conversation goes on, with the stopped answer in its history
    cold = list(stream_generate(model, processor, messages=chat.messages[:-1], system=None, max_tokens=40))
    assert out.getvalue().endswith("\n" + "".join(r.text for r in cold) + "\n")


def test_ctrl_c_or_ctrl_d_at_the_prompt_quits(local):
    from fastvlm_mlx.chat import _converse

    def typing(line, then):
        """One line typed, then Ctrl-C (KeyboardInterrupt) or Ctrl-D (EOFError) at the prompt."""
        lines = iter([line])

        def read():
            typed = next(lines, None)
            if typed is None:
                raise then
            return typed

        return read

    for key in (KeyboardInterrupt, EOFError):
        repl, _, _ = _repl(local)
        _converse(repl, typing("Hello there.\n", key))  # returns instead of raising
        assert len(repl.chat.messages) == 3


def test_chat_line_editing_and_history(local):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from fastvlm_mlx.chat import line_reader

    left, up = "\x1b[D", "\x1b[A"
    with create_pipe_input() as keys:
        read = line_reader(True, input=keys, output=DummyOutput())
        keys.send_text("Hello thre" + left * 2 + "e" + "\r")  # a typo fixed in the middle of the line
        assert read() == "Hello there\n"
        keys.send_text(up + "!\r")  # the last line recalled, and added to
        assert read() == "Hello there!\n"


def test_chat_missing_image_fails_like_generate():
    for command in (("fastvlm_mlx.chat",), ("fastvlm_mlx.generate", "-p", "hi")):
        # the image is checked before the model is loaded: its error comes first
        proc = run_cli(*command, "--model", str(FIXTURES / "nope"), "--image", "missing.jpg", input="")
        assert proc.returncode == 1
        assert_clean_error(proc, "missing.jpg", "no such file")


# ----------------------------------------------------------------------------- image URLs, paths
@pytest.fixture
def image_site():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURES / "images"))
    handler.log_message = lambda *a: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()
    thread.join(timeout=10)


def test_generate_fetches_image_urls(image_site, local):
    model, processor = local
    proc = run_cli(
        "fastvlm_mlx.generate",
        "-m",
        MODEL,
        "-i",
        f"{image_site}/photo.png",
        "-i",
        str(PHOTO2),
        "-p",
        "Compare the two images.",
        "--max-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    expected = generate(model, processor, "Compare the two images.", image=[PHOTO, PHOTO2], max_tokens=8)
    assert proc.stdout == expected + "\n"
    assert_clean_error(
        run_cli("fastvlm_mlx.generate", "-m", MODEL, "-p", "hi", "-i", f"{image_site}/none.png"),
        f"{image_site}/none.png",
        "HTTP 404",
    )


def test_a_missing_relative_model_path_is_not_a_hub_id(tmp_path):
    (tmp_path / "models").mkdir()
    here = {"PYTHONPATH": str(ROOT)}  # this checkout's package, from another working directory
    for command in (("fastvlm_mlx.generate", "-p", "hi", "-m"), ("fastvlm_mlx.convert", "--hf-path")):
        proc = run_cli(*command, "models/fastvlm", cwd=tmp_path, env=here)
        assert_clean_error(proc, "models/fastvlm: no such model directory")
        assert "hugging face" not in proc.stderr.lower()
        # what could be a hub id is tried there (offline here); the message names no flag
        proc = run_cli(*command, "no-such-owner/fastvlm", cwd=tmp_path, env=here)
        assert_clean_error(proc, "no-such-owner/fastvlm", "no such model directory", "hugging face")
        assert " --" not in proc.stderr


# -------------------------------------------------------------------------------------- batch
def test_batch_output_naming_a_directory_is_one_line(tmp_path):
    proc = run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(FIXTURES / "images"), "-o", str(tmp_path))
    assert_clean_error(proc, str(tmp_path), "is a directory")
    assert proc.returncode == 1


def test_batch_ctrl_c_exits_130_and_resumes(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": str(i), "image": str(PHOTO if i % 2 else PHOTO2)}) + "\n" for i in range(30))
    )
    out = tmp_path / "out.jsonl"
    args = ["-m", MODEL, "-i", str(src), "-o", str(out), "--max-tokens", "200", "--batch-size", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvlm_mlx.batch", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted:")
    done = records(out)  # every line whole
    assert 2 <= len(done) < 30
    again = run_cli("fastvlm_mlx.batch", *args)
    assert again.returncode == 0, again.stderr
    assert f"{len(done)} already" in again.stderr
    assert sorted(r["id"] for r in records(out)) == sorted(str(i) for i in range(30))


def test_batch_retry_errors(tmp_path, local, monkeypatch):
    import shutil

    from fastvlm_mlx import batch

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() installs ours: undone after
    late = tmp_path / "late.png"
    src = tmp_path / "in.txt"
    src.write_text(f"{PHOTO}\n{late}\n")
    out = tmp_path / "out.jsonl"
    args = ["-m", MODEL, "-i", str(src), "-o", str(out), "--max-tokens", "6"]
    assert batch.main(args) == 1  # as the console script fastvlm-batch runs it
    first = {r["id"]: r for r in records(out)}
    assert "no such file" in first[str(late)]["error"]
    assert batch.main(args) == 1 and records(out) == list(first.values())  # without the flag: left as it is
    shutil.copy(PHOTO2, late)
    assert batch.main(args + ["--retry-errors"]) == 0
    final = records(out)
    assert [r["id"] for r in final] == [str(PHOTO), str(late)]  # each once, the good record untouched
    assert final[0] == first[str(PHOTO)] and "error" not in final[1]
    model, processor = local
    assert final[1]["text"] == generate(model, processor, "Describe the image.", image=PHOTO2, max_tokens=6)
    assert not list(tmp_path.glob("*.retrying"))


# ------------------------------------------------------------------------------------- server
def test_server_binds_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model that does not exist: the port is refused first, so the model was never looked at
        proc = run_cli("fastvlm_mlx.server", "--model", str(FIXTURES / "nope"), "--port", str(port), timeout=60)
    assert_clean_error(proc, f"127.0.0.1:{port}", "in use")
    assert "serving" not in proc.stderr


def test_server_says_serving_once_listening():
    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastvlm_mlx.server",
            "--model",
            MODEL,
            "--port",
            "0",
            "--max-tokens",
            "5",
            "--max-tokens-limit",
            "100000",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # blocks until the line, or the end of the process
        assert line.startswith("fastvlm-mlx serving") and " on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].strip()
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code == 200  # at once, no retry
        body = {"messages": [{"role": "user", "content": "Hello there."}]}
        usage = httpx.post(url + "/chat/completions", json=body, timeout=60).json()["usage"]
        assert usage["completion_tokens"] == 5  # --max-tokens is the default of requests
        reply = httpx.post(url + "/chat/completions", json=dict(body, max_tokens=100_000), timeout=120).json()
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["total_tokens"] == CONTEXT  # stopped at the context
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        proc.stderr.close()


# ------------------------------------------------------------------------------------ convert
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_convert_progress_reaches_100_percent_with_warnings_above_it(tmp_path, monkeypatch):
    from fastvlm_mlx.convert import main
    from fastvlm_mlx.model import FastVLM

    original = FastVLM.set_dtype

    def set_dtype(self, dtype, *args, **kwargs):
        warnings.warn("something to know about this checkpoint", stacklevel=1)
        return original(self, dtype, *args, **kwargs)

    monkeypatch.setattr(FastVLM, "set_dtype", set_dtype)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() installs ours: undone after
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    old_umask = os.umask(0o022)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with pytest.raises(SystemExit) as exited:  # typer's way out, also on success
                main(["--hf-path", MODEL, "--mlx-path", str(tmp_path / "out"), "--dtype", "float32"])
    finally:
        os.umask(old_umask)
    assert not exited.value.code
    shown = terminal.getvalue()
    frames = [f for f in shown.replace("\n", "\r").split("\r") if f.strip()]
    bars = [f for f in frames if f.startswith("converting")]
    assert "100%" in bars[-1] and "3/3" in bars[-1], bars[-1]
    assert "warning: something to know about this checkpoint" in frames  # a line of its own, not in the bar
    assert not any("warning" in f for f in bars) and "UserWarning" not in shown
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # the umask's folder, as mkdir makes
