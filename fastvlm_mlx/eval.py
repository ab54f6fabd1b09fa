"""``python -m fastvlm_mlx.eval``: score a model on a JSONL file of questions about images (``fastvlm-eval``).

    python -m fastvlm_mlx.eval --model M --data textvqa_val.jsonl --metric vqa

Each line of ``--data`` is ``{"id"?, "image": PATH, "question": ..., "answers": [...] or "answer": ...,
"choices"?: [...]}``; images resolve relative to ``--image-folder``, else to the data file.  Every question is
answered through the batch captioner's decoder (``captioner.caption``: batched, greedy by default), scored with
``--metric`` (``eval_metrics``), and written to ``--output`` (one JSON line per item, in the data's order) and a
summary JSON (the score, with the time to first token beside it).  Under ``--metric multiple_choice`` the choices
are listed in the prompt with letters and the answer is constrained to one of the letters (``--no-constrain``
leaves it free and parses the letter from the text, as MMMU does).  A bad line stops the run before the model
loads, naming the file and line; an image that fails to decode during the run is an error record scored 0.
"""

import json
import statistics
import sys
import time
from pathlib import Path

from .errors import FastVLMError
from .eval_metrics import METRIC_NAMES, METRICS, choice_letters, parse_choice

# what lmms-eval's tasks append to the question (VQAv2, TextVQA, DocVQA, ChartQA; AI2D, ScienceQA)
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


def _answers(row: dict, where: str) -> list[str]:
    """The reference answers of a line: ``answers`` (strings, or VQA's ``{"answer": ...}`` objects) or ``answer``."""
    if "answers" in row:
        answers = row["answers"]
        if isinstance(answers, list):
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise FastVLMError(f"{where}: 'answers' must be a non-empty list of strings")
        return answers
    if isinstance(row.get("answer"), str):
        return [row["answer"]]
    raise FastVLMError(f"{where}: needs 'answers' (a list of strings) or 'answer' (a string)")


def _answer_letter(row: dict, choices: list[str], where: str) -> str:
    """A multiple-choice answer as its letter: given as the letter, as the option's text, or as its index."""
    letters = choice_letters(len(choices))
    answer = row.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return letters[answer]
    if isinstance(answer, str):
        if answer.strip() in letters:
            return answer.strip()
        if answer in choices:
            return letters[choices.index(answer)]
    raise FastVLMError(
        f"{where}: 'answer' must be a letter {letters[0]}-{letters[-1]}, one of the choices or a 0-based index "
        f"(got {answer!r})"
    )


def read_items(path: Path, metric: str, image_folder: Path | None = None) -> list[dict]:
    """The items of a data file, checked: every problem is reported as FILE:LINE (1-based) before any work."""
    if metric not in METRIC_NAMES:
        raise FastVLMError(f"--metric must be one of {', '.join(METRIC_NAMES)} (got {metric!r})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FastVLMError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FastVLMError(f"{path}: cannot read the data file ({getattr(e, 'strerror', None) or e})") from None
    base = image_folder if image_folder is not None else path.parent
    items, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError:
            raise FastVLMError(f"{where}: not valid JSON") from None
        if not isinstance(row, dict):
            raise FastVLMError(f"{where}: each line must be a JSON object")
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise FastVLMError(f"{where}: 'image' must be the path of an image file")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise FastVLMError(f"{where}: 'question' must be a non-empty string")
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else base / image
        if not image.is_file():
            raise FastVLMError(f"{where}: {image}: no such image file")
        item = {"id": str(row.get("id", n)), "image": str(image), "question": row["question"]}
        if item["id"] in seen:
            raise FastVLMError(f"{where}: id {item['id']!r} appears more than once")
        seen.add(item["id"])
        if metric == "multiple_choice":
            choices = row.get("choices")
            if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
                raise FastVLMError(f"{where}: 'choices' must be a list of 2 to 26 options for multiple_choice")
            if not all(isinstance(c, str) and c.strip() for c in choices):
                raise FastVLMError(f"{where}: every choice must be a non-empty string")
            item.update(choices=choices, answer=_answer_letter(row, choices, where))
        else:
            item["answers"] = _answers(row, where)
        items.append(item)
    if not items:
        raise FastVLMError(f"{path}: no items")
    return items


def prompt_for(item: dict, instruction: str) -> str:
    """The question as the model is asked it: lmms-eval's layout, the choices as "A. text" lines."""
    parts = [item["question"]]
    if "choices" in item:
        parts += [f"{letter}. {text}" for letter, text in zip(choice_letters(len(item["choices"])), item["choices"])]
    if instruction:
        parts.append(instruction)
    return "\n".join(parts)


def score(metric: str, prediction: str, item: dict) -> tuple[float, dict]:
    """The score of one prediction, and what the record adds (the parsed letter for multiple choice)."""
    if metric == "multiple_choice":
        letter = parse_choice(prediction, item["choices"])
        return float(letter == item["answer"]), {"parsed": letter}
    return METRICS[metric](prediction, item["answers"]), {}


def answer_all(engine, items: list[dict], metric: str, sampling: dict, batch_size: int, constrain: bool, write):
    """Answer every item through the captioner's batched decoding; ``write(item, record)`` as each finishes.  Under
    multiple choice with ``constrain``, the items go in groups of one number of choices, each with its letters'
    constraint."""
    from .captioner import caption
    from .structured import from_choices

    by_id = {item["id"]: item for item in items}
    groups: dict[int, list[dict]] = {}
    for item in items:
        key = len(item["choices"]) if metric == "multiple_choice" and constrain else 0
        groups.setdefault(key, []).append(item)
    for count, group in groups.items():
        constraint = from_choices(choice_letters(count)) if count else None
        caption(engine, group, sampling, batch_size, lambda r: write(by_id[r["id"]], r), constraint)


def make_record(metric: str, item: dict, answered: dict) -> dict:
    """The output line of one item: the prediction and its score, or the error (scored 0)."""
    record = {"id": item["id"], "image": item["image"], "question": item["question"]}
    record.update({k: item[k] for k in ("choices", "answer", "answers") if k in item})
    if "error" in answered:
        return {**record, "prediction": None, "score": 0.0, "error": answered["error"]}
    value, extra = score(metric, answered["text"], item)
    record.update(prediction=answered["text"], **extra, score=value)
    record.update({k: answered[k] for k in ("ttft_ms", "prompt_tokens", "generation_tokens", "finish_reason")})
    return record


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the nearest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(metric: str, records: list[dict], **context) -> dict:
    """The score (mean over every item, failed ones as 0) and the TTFT statistics of the answered items."""
    ttfts = [r["ttft_ms"] for r in records if "error" not in r]
    summary = {
        "metric": metric,
        "score": sum(r["score"] for r in records) / len(records),
        "items": len(records),
        "failed": sum(1 for r in records if "error" in r),
        **context,
    }
    if ttfts:
        summary["ttft_ms"] = {
            "median": statistics.median(ttfts),
            "p90": percentile(ttfts, 90),
            "mean": statistics.fmean(ttfts),
        }
    return summary


def evaluate(
    engine, items: list[dict], metric: str, sampling: dict, batch_size: int = 8, constrain: bool = True, bar=None
) -> list[dict]:
    """The records of ``items`` (``read_items``), in their order; ``bar`` (tqdm) is advanced per item."""
    done: dict[str, dict] = {}

    def write(item: dict, answered: dict) -> None:
        done[item["id"]] = make_record(metric, item, answered)
        if bar is not None:
            bar.update(1)

    answer_all(engine, items, metric, sampling, batch_size, constrain, write)
    return [done[item["id"]] for item in items]


def _write_outputs(output: Path, summary_path: Path, records: list[dict], summary: dict) -> None:
    for path in (output, summary_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """The ``fastvlm-eval`` command; returns the exit status."""
    import typer

    from .cli import (
        adapter_path_option,
        dtype_option,
        model_option,
        sampling_options,
        use_one_line_warnings,
        warnings_above,
    )
    from .errors import exit_on_user_error

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Answer a JSONL file of questions about images and score the answers.")
    @exit_on_user_error
    @sampling_options
    def run(
        model_path: str = model_option(),
        dtype: str | None = dtype_option(),
        adapter_path: str | None = adapter_path_option(),
        data: Path = typer.Option(..., "--data", "-d", help="JSONL file of image, question, answers (and choices)."),
        metric: str = typer.Option(
            "vqa", "--metric", help=f"How answers are scored: {', '.join(METRIC_NAMES)}.", show_default=True
        ),
        image_folder: Path | None = typer.Option(
            None, "--image-folder", help="Where relative image paths start (default: the data file's folder)."
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Predictions JSONL to write (default: DATA's name + .predictions.jsonl, here)."
        ),
        summary_path: Path | None = typer.Option(
            None, "--summary", help="Summary JSON to write (default: the predictions' name + .summary.json)."
        ),
        instruction: str | None = typer.Option(
            None,
            "--instruction",
            help=f"Line added after each question ('' for none; default: '{SHORT_ANSWER}', or for multiple choice "
            f"'{LETTER_ANSWER}').",
        ),
        batch_size: int = typer.Option(8, "--batch-size", help="Questions encoded and decoded together."),
        constrain: bool = typer.Option(
            True, "--constrain/--no-constrain", help="Multiple choice: the answer is always one of the letters."
        ),
        sampling: dict | None = None,
    ):
        from tqdm import tqdm

        from .engine import engine_for
        from .loader import load

        if batch_size < 1:
            raise FastVLMError(f"--batch-size must be at least 1 (got {batch_size})")
        items = read_items(data, metric, image_folder)  # a bad line fails before the model loads
        if instruction is None:
            instruction = LETTER_ANSWER if metric == "multiple_choice" else SHORT_ANSWER
        for item in items:
            item["prompt"] = prompt_for(item, instruction)
        output = output or Path(f"{data.stem}.predictions.jsonl")
        summary_path = summary_path or output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")
        model, processor = load(model_path, dtype=dtype, adapter_path=adapter_path)
        start = time.perf_counter()
        with tqdm(total=len(items), unit="q", file=sys.stderr, dynamic_ncols=True) as bar, warnings_above(bar):
            records = evaluate(engine_for(model, processor), items, metric, sampling, batch_size, constrain, bar)
        elapsed = time.perf_counter() - start
        summary = summarize(
            metric,
            records,
            model=model_path,
            adapter_path=adapter_path,
            data=str(data),
            constrained=metric == "multiple_choice" and constrain,
            batch_size=batch_size,
            sampling=sampling,
            seconds=elapsed,
            items_per_s=len(records) / elapsed if elapsed else None,
        )
        _write_outputs(output, summary_path, records, summary)
        ttft = summary.get("ttft_ms")
        timing = f"TTFT median {ttft['median']:.1f} ms, p90 {ttft['p90']:.1f} ms; " if ttft else ""
        failed = f", {summary['failed']} failed (scored 0)" if summary["failed"] else ""
        print(
            f"{metric}: {100 * summary['score']:.2f} over {len(records)} items{failed}; {timing}"
            f"{summary['items_per_s'] or 0:.3g} items/s; predictions in {output}, summary in {summary_path}"
        )

    try:
        app(args=argv, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):  # click's usage errors
            e.show()
            return e.exit_code
        if type(e).__name__ == "Abort":  # Ctrl-C
            from .cli import report_interrupt

            return report_interrupt()
        raise
    except KeyboardInterrupt:
        from .cli import report_interrupt

        return report_interrupt()
    return 0


if __name__ == "__main__":
    sys.exit(main())
