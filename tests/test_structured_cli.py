"""Structured output from the command lines: batch, chat and generate with --schema, --regex and --choices.

Validity is checked by independent judges (the jsonschema package, Python's re.fullmatch, list membership);
answers are compared with the Python API's single-request path, which decodes without the batch decoder."""

import json
import re
import shutil

import jsonschema
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, assert_clean_error, run_cli

from fastvlm_mlx import ChatSession, generate, load

MODEL = str(FIXTURES / "format_a")
# strings are bounded (enum, maxLength, pattern): random weights rarely close an unbounded one
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog", "red ball"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "note": {"type": "string", "maxLength": 6},
        "code": {"type": "string", "pattern": "^[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "count", "note", "code", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = "[a-c]{2}-[0-9]{1,3}"
CHOICES = ["cat", "dog", "a red ball"]


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


@pytest.fixture
def inputs(tmp_path):
    """Three images, each with its own prompt (a JSONL input), so that the answers differ."""
    shutil.copy(PHOTO, tmp_path / "a.png")
    shutil.copy(PHOTO2, tmp_path / "b.png")
    from PIL import Image

    Image.open(PHOTO).convert("RGB").save(tmp_path / "c.jpg", quality=90)
    rows = [
        {"id": "a", "image": str(tmp_path / "a.png"), "prompt": "What is in the picture?"},
        {"id": "b", "image": str(tmp_path / "b.png"), "prompt": "Describe the image."},
        {"id": "c", "image": str(tmp_path / "c.jpg"), "prompt": "Name the object, as JSON."},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def records(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def batch(inputs, out, *flags):
    return run_cli("fastvlm_mlx.batch", "-m", MODEL, "-i", str(inputs), "-o", str(out), "--batch-size", "2", *flags)


# ------------------------------------------------------------------------------------------ batch
def test_batch_schema_records_validate_and_equal_single_requests(inputs, schema_file, tmp_path, local):
    model, processor = local
    source, rows = inputs
    out = tmp_path / "out.jsonl"
    proc = batch(source, out, "--schema", str(schema_file), "--max-tokens", "96")
    assert proc.returncode == 0, proc.stderr
    got = records(out)
    assert set(got) == {"a", "b", "c"}
    for row in rows:
        r = got[row["id"]]
        assert "error" not in r and r["finish_reason"] == "stop", r
        jsonschema.validate(r["json"], SCHEMA)
        assert r["json"] == json.loads(r["text"])
        alone = generate(model, processor, row["prompt"], image=row["image"], schema=SCHEMA, max_tokens=96)
        assert r["text"] == alone, row["id"]
    assert len({r["text"] for r in got.values()}) > 1  # the items are not all answered alike


def test_batch_regex_and_choices(inputs, tmp_path, local):
    model, processor = local
    source, rows = inputs
    out = tmp_path / "regex.jsonl"
    proc = batch(source, out, "--regex", REGEX, "--max-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    for r in records(out).values():
        assert re.fullmatch(REGEX, r["text"]), r
        assert "json" not in r  # the text is the value
    out = tmp_path / "choices.jsonl"
    proc = batch(source, out, "--choices", " , ".join(CHOICES), "--max-tokens", "32")  # blanks around each ignored
    assert proc.returncode == 0, proc.stderr
    got = records(out)
    for row in rows:
        r = got[row["id"]]
        assert r["text"] in CHOICES and "json" not in r, r
        assert r["text"] == generate(model, processor, row["prompt"], image=row["image"], choices=CHOICES)


def test_batch_answer_cut_by_max_tokens_is_an_error_record_retried(inputs, schema_file, tmp_path):
    source, rows = inputs
    out = tmp_path / "out.jsonl"
    proc = batch(source, out, "--schema", str(schema_file), "--max-tokens", "3")
    assert proc.returncode == 1, proc.stderr  # as any run that leaves error records
    assert "3 input(s) with errors" in proc.stderr and "Traceback" not in proc.stderr
    for r in records(out).values():
        assert r["error"] == "the answer reached --max-tokens (3) before it matched the schema", r
        assert "text" not in r and "json" not in r
    proc = batch(source, out, "--schema", str(schema_file), "--max-tokens", "96", "--retry-errors")
    assert proc.returncode == 0, proc.stderr
    got = records(out)
    assert sorted(got) == ["a", "b", "c"] and len(out.read_text().splitlines()) == 3
    for r in got.values():
        jsonschema.validate(r["json"], SCHEMA)


def test_bad_structured_flags_are_one_line_before_the_model_loads(tmp_path):
    nope = str(FIXTURES / "nope")  # the model is never reached: each error names the flag's problem
    out = tmp_path / "out.jsonl"
    bad_type = tmp_path / "bad.json"
    bad_type.write_text('{"type": "frob"}')
    not_json = tmp_path / "not.json"
    not_json.write_text("{'type': 'object'}")
    cases = [
        (("--schema", str(bad_type)), ("bad.json", "frob")),
        (("--schema", str(not_json)), ("not.json", "not valid JSON")),
        (("--schema", str(tmp_path / "missing.json")), ("missing.json", "no such")),
        (("--regex", "(unclosed"), ("regex", "unclosed group")),
        (("--choices", "yes,,no"), ("--choices", "empty choice")),
        (("--regex", "a", "--choices", "a,b"), ("--regex", "--choices")),
    ]
    for flags, words in cases:
        proc = run_cli("fastvlm_mlx.batch", "-m", nope, "-i", str(FIXTURES / "images"), "-o", str(out), *flags)
        assert proc.returncode == 1
        assert_clean_error(proc, *words)
        assert not out.exists()
    proc = run_cli("fastvlm_mlx.generate", "-m", nope, "-p", "hi", "--schema", str(bad_type))
    assert_clean_error(proc, "bad.json", "frob")


def test_every_front_end_has_the_same_structured_flags(monkeypatch):
    from test_frontends import _click_command

    from fastvlm_mlx.cli import STRUCTURED_FLAGS

    seen = []
    for module in ("fastvlm_mlx.generate", "fastvlm_mlx.chat", "fastvlm_mlx.batch"):
        params = {p.name: p for p in _click_command(module, monkeypatch).params}
        seen.append({n: (tuple(params[n].opts), params[n].default, params[n].help) for n in STRUCTURED_FLAGS})
    assert seen[0] == seen[1] == seen[2]
    assert [flags for flags, _, _ in seen[0].values()] == [("--schema",), ("--regex",), ("--choices",)]


# ------------------------------------------------------------------------------------------- chat
def test_chat_schema_then_off_then_a_bad_file(schema_file, tmp_path, local):
    model, processor = local
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}')
    script = "\n".join(
        [
            "/schema",
            f"/schema {schema_file}",
            f"/image {PHOTO}",
            "What is in the picture?",
            "/schema off",
            "And now?",
            f"/schema {bad}",
            "Hello there.",
            "/schema",
        ]
    )
    proc = run_cli("fastvlm_mlx.chat", "--model", MODEL, "--max-tokens", "96", input=script + "\n")
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.split("\n")[:-1]
    assert len(answers) == 3, proc.stdout
    jsonschema.validate(json.loads(answers[0]), SCHEMA)
    chat = ChatSession(model, processor)
    assert answers[0] == chat.ask("What is in the picture?", [PHOTO], schema=SCHEMA, max_tokens=96)
    assert answers[1] == chat.ask("And now?", max_tokens=96)  # free text again
    assert answers[2] == chat.ask("Hello there.", max_tokens=96)  # the bad file changed nothing
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.json" in errors[0] and "nowhere" in errors[0], proc.stderr
    said = proc.stderr.splitlines()
    assert said[0] == "no schema: answers are free text" and said[-1] == said[0]
    assert f"answers follow the JSON schema in {schema_file}" in said[1]
    assert "Traceback" not in proc.stderr


def test_chat_answer_cut_by_max_tokens_warns(schema_file, local):
    import io

    from fastvlm_mlx.chat import ChatREPL
    from fastvlm_mlx.cli import choices_list

    model, processor = local
    out, err = io.StringIO(), io.StringIO()
    repl = ChatREPL(ChatSession(model, processor), dict(max_tokens=3), out=out, err=err)
    assert repl.handle(f"/schema {schema_file}") and repl.handle("Describe it.")
    assert (
        err.getvalue().splitlines()[-1] == "warning: the answer reached --max-tokens (3) before it matched the schema"
    )
    assert repl.handle("/schema off") and repl.handle("Go on.")  # free text may stop anywhere: no warning
    assert err.getvalue().count("warning:") == 1
    repl = ChatREPL(
        ChatSession(model, processor), dict(max_tokens=16), out=out, err=err, constraint=choices_list("a,b")
    )
    assert repl.handle("Pick one.") and out.getvalue().splitlines()[-1] in ("a", "b")


# --------------------------------------------------------------------------------------- generate
def test_generate_choices_and_a_cut_schema(schema_file, local):
    model, processor = local
    proc = run_cli(
        "fastvlm_mlx.generate", "-m", MODEL, "-i", str(PHOTO), "-p", "What is it?", "--choices", ",".join(CHOICES)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] in CHOICES and proc.stdout.endswith("\n")
    assert proc.stdout[:-1] == generate(model, processor, "What is it?", image=PHOTO, choices=CHOICES)
    proc = run_cli(
        "fastvlm_mlx.generate", "-m", MODEL, "-p", "What is it?", "--schema", str(schema_file), "--max-tokens", "4"
    )
    assert proc.returncode == 1 and proc.stdout.startswith("{")  # printed as far as it got, then the error
    assert_clean_error(proc, "--max-tokens (4)", "schema")


# ------------------------------------------------------------------------------------ ranked batch
def test_tensor_parallel_batch_with_a_schema_equals_one_process(schema_file, tmp_path, local):
    from test_distributed import Ranks

    model, processor = local
    src = tmp_path / "list.txt"
    src.write_text(f"{PHOTO}\n{PHOTO2}\n")
    out = tmp_path / "tp.jsonl"
    cmd = ["-m", "fastvlm_mlx.batch", "-m", MODEL, "-i", str(src), "-o", str(out), "--max-tokens", "96"]
    with Ranks(tmp_path, cmd + ["--schema", str(schema_file), "--parallel", "tensor"]) as ranks:
        (code0, _, err0), (code1, _, err1) = ranks.wait()
    assert code0 == 0 and code1 == 0, err0 + err1
    got = records(out)
    for p in (PHOTO, PHOTO2):
        jsonschema.validate(got[str(p)]["json"], SCHEMA)
        assert got[str(p)]["text"] == generate(
            model, processor, "Describe the image.", image=p, schema=SCHEMA, max_tokens=96
        )
