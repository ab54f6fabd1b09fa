"""``python -m fastvlm_mlx.eval``: each metric scores as lmms-eval's own function does (eval_reference.json, made
by tests/fixtures/make_eval_reference.py with lmms-eval), and the command answers as ``generate`` does one at a
time, scores what it wrote, refuses bad lines by FILE:LINE, and keeps multiple-choice answers to the letters."""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, PHOTO, PHOTO2, assert_clean_error, run_cli

from fastvlm_mlx import eval_metrics, generate, load
from fastvlm_mlx.eval import SHORT_ANSWER, main, percentile, prompt_for, read_items

MODEL = str(FIXTURES / "format_a")
REFERENCE = json.loads((FIXTURES / "eval_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def local():
    return load(MODEL)


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("metric", ["vqa", "textvqa", "anls", "relaxed", "exact_match"])
def test_metric_matches_lmms_eval(metric):
    cases = REFERENCE["cases"][metric]
    assert len(cases) >= 8 and {c["score"] for c in cases} != {0.0}
    for case in cases:
        got = eval_metrics.METRICS[metric](case["prediction"], case["answers"])
        assert got == pytest.approx(case["score"], abs=1e-12), case


def test_multiple_choice_parsing_matches_lmms_eval():
    cases = REFERENCE["cases"]["multiple_choice"]
    assert any(c["parsed"] is None for c in cases) and any(c["score"] == 1.0 for c in cases)
    for case in cases:
        assert eval_metrics.parse_choice(case["prediction"], case["choices"]) == case["parsed"], case
        assert eval_metrics.multiple_choice(case["prediction"], case["answer"], case["choices"]) == case["score"], case


def test_levenshtein_and_percentile_against_independent_definitions():
    def slow(a, b):  # the textbook recursion, memoised
        import functools

        @functools.lru_cache(None)
        def d(i, j):
            if not i or not j:
                return i + j
            return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

        return d(len(a), len(b))

    for a, b in [("kitten", "sitting"), ("", "abc"), ("flaw", "lawn"), ("abc", "abc"), ("straße", "strasse")]:
        assert eval_metrics.levenshtein(a, b) == slow(a, b) == eval_metrics.levenshtein(b, a)
    values = [5.0, 1.0, 9.5, 3.25, 7.0, 2.0, 8.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_cli_answers_as_generate_and_scores_what_it_wrote(tmp_path, local):
    model, processor = local
    images = tmp_path / "pictures"
    images.mkdir()
    shutil.copy(PHOTO, images / "a.png")
    shutil.copy(PHOTO2, images / "b.png")
    questions = ["What color is it?", "How many are there?", "Describe it."]
    pictures = ["a.png", "b.png", "a.png"]
    predictions = [
        generate(model, processor, prompt_for({"question": q}, SHORT_ANSWER), image=images / p, max_tokens=6)
        for q, p in zip(questions, pictures)
    ]
    # answers that give the three items scores of 1, 0.3 and 0 (if the greedy answers are what generate gave)
    answers = [[predictions[0]] * 3 + ["x"] * 7, [predictions[1]] + ["y"] * 9, ["nothing at all"]]
    rows = [
        {"id": f"q{i}", "image": p, "question": q, "answers": a}
        for i, (q, p, a) in enumerate(zip(questions, pictures, answers))
    ]
    rows[1] = {"image": "b.png", "question": questions[1], "answers": answers[1]}  # its id: its line number
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "set.jsonl", rows)
    out = tmp_path / "out" / "preds.jsonl"
    proc = run_cli(
        "fastvlm_mlx.eval",
        "--model",
        MODEL,
        "--data",
        str(data),
        "--image-folder",
        str(images),
        "--metric",
        "vqa",
        "--max-tokens",
        "6",
        "--batch-size",
        "2",
        "--output",
        str(out),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = lines(out)
    assert [r["id"] for r in records] == ["q0", "2", "q2"]
    assert [r["prediction"] for r in records] == predictions
    summary = json.loads((tmp_path / "out" / "preds.summary.json").read_text())
    recomputed = [eval_metrics.vqa_accuracy(r["prediction"], r["answers"]) for r in records]
    assert [r["score"] for r in records] == recomputed
    assert summary["score"] == pytest.approx(sum(recomputed) / 3) and summary["items"] == 3
    assert summary["score"] > 0, "the answers were made from the greedy predictions, so some must score"
    ttfts = [r["ttft_ms"] for r in records]
    assert all(t > 0 for t in ttfts)
    assert summary["ttft_ms"]["median"] == pytest.approx(float(np.median(ttfts)))
    assert summary["ttft_ms"]["p90"] == pytest.approx(float(np.percentile(ttfts, 90)))
    assert f"vqa: {100 * summary['score']:.2f} over 3 items" in proc.stdout


def test_images_resolve_relative_to_the_data_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    shutil.copy(PHOTO, tmp_path / "imgs" / "a.png")
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "imgs/a.png", "question": "Q?", "choices": ["x", "y", "z"], "answer": "z"},
            {"image": str(PHOTO), "question": "Q?", "choices": ["x", "y"], "answer": 0},
            {"image": "imgs/a.png", "question": "Q?", "choices": ["x", "y"], "answer": " B"},
        ],
    )
    items = read_items(data, "multiple_choice")
    assert [i["image"] for i in items] == [str(tmp_path / "imgs" / "a.png"), str(PHOTO), str(tmp_path / "imgs/a.png")]
    assert [i["answer"] for i in items] == ["C", "A", "B"]
    assert prompt_for(items[0], "Pick.") == "Q?\nA. x\nB. y\nC. z\nPick."


BAD = [
    (['{"image": "photo.png", "question": "Q?", "answer": "a"}', "{not json"], 2, "not valid JSON"),
    (['{"image": "missing.png", "question": "Q?", "answer": "a"}'], 1, "no such image file"),
    (['{"image": "photo.png", "question": "Q?"}'], 1, "needs 'answers'"),
    (['{"image": "photo.png", "question": "Q?", "answers": []}'], 1, "non-empty list"),
    (['{"image": "photo.png", "question": "", "answer": "a"}'], 1, "'question'"),
    (["", '["a list"]'], 2, "JSON object"),
    (['{"id": 1, "image": "photo.png", "question": "Q?", "answer": "a"}'] * 2, 2, "appears more than once"),
]
BAD_CHOICE = [
    (['{"image": "photo.png", "question": "Q?", "answer": "A"}'], 1, "'choices'"),
    (['{"image": "photo.png", "question": "Q?", "choices": ["x", "y"], "answer": "C"}'], 1, "letter A-B"),
    (['{"image": "photo.png", "question": "Q?", "choices": ["x", ""], "answer": "A"}'], 1, "non-empty string"),
]


@pytest.mark.parametrize(
    "rows,line,words,metric", [(*bad, "exact_match") for bad in BAD] + [(*bad, "multiple_choice") for bad in BAD_CHOICE]
)
def test_bad_line_is_one_line_error_with_file_and_line(tmp_path, capsys, rows, line, words, metric):
    shutil.copy(PHOTO, tmp_path / "photo.png")
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    # a model path that does not exist: the data is checked before any model loads
    status = main(["--model", str(tmp_path / "no-model"), "--data", str(data), "--metric", metric])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {data}:{line}: ") and words in err[0], err[0]


def test_bad_line_from_the_command_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", ['{"image": "nowhere.png", "question": "Q?", "answer": "a"}'])
    proc = run_cli("fastvlm_mlx.eval", "--model", MODEL, "--data", str(data), timeout=120)
    assert_clean_error(proc, f"{data}:1:", "no such image file")


def test_multiple_choice_constraint_always_gives_a_valid_letter(tmp_path, capsys):
    choices = [["red", "green"], ["one", "two", "three"], ["a", "b", "c", "d", "e"]]
    rows = [
        {"id": f"m{i}", "image": str(PHOTO if i % 2 else PHOTO2), "question": f"Which one? ({i})", "choices": c}
        | {"answer": "A"}
        for i, c in enumerate(choices * 2)
    ]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    base = ["--model", MODEL, "--data", str(data), "--metric", "multiple_choice", "--max-tokens", "6"]
    assert main([*base, "--batch-size", "4", "-o", str(tmp_path / "c.jsonl")]) == 0
    constrained = lines(tmp_path / "c.jsonl")
    for record in constrained:
        letters = eval_metrics.choice_letters(len(record["choices"]))
        assert record["prediction"] in letters and record["parsed"] == record["prediction"], record
        assert record["score"] == float(record["prediction"] == "A")
    summary = json.loads((tmp_path / "c.summary.json").read_text())
    assert summary["constrained"] and summary["score"] == pytest.approx(sum(r["score"] for r in constrained) / 6)
    # the same random-weight model, free: its answers are not letters, so the constraint did the work
    assert main([*base, "--no-constrain", "-o", str(tmp_path / "f.jsonl")]) == 0
    free = lines(tmp_path / "f.jsonl")
    assert not all(r["prediction"] in eval_metrics.choice_letters(len(r["choices"])) for r in free)
    capsys.readouterr()
