"""The captioner: caption or question a whole image collection, resumably (``python -m fastvlm_mlx.batch``).

    python -m fastvlm_mlx.batch --model M --input photos/ --output captions.jsonl --prompt "Describe the image."

``--input`` is a directory (searched recursively for image files, sorted), a glob, a text file with one path per
line, or a JSONL file of ``{"id": ..., "image": PATH, "prompt": ...}`` rows (``prompt`` falls back to
``--prompt``); a row may name a ``"video"`` file instead, whose frames (``"frames": N``, 8 by default, or ``"fps":
F``) go into its prompt with their times (``fastvlm_mlx.video``).  Images (and videos) are decoded ahead of the
model on a background thread, encoded ``--batch-size`` at a time in one vision-tower call, and decoded together
(``batching.BatchDecoder``, the server's batching).  Each finished input appends one JSON line to ``--output`` and
flushes it; a re-run skips the ids already there (a torn last line is dropped first), so a run stopped at any point
resumes where it was.  With ``--schema FILE`` (a JSON Schema), ``--regex`` or ``--choices`` every answer matches
it; under ``--schema`` the record also holds the decoded answer under ``json``.  A missing, corrupt or oversized
image, or a structured answer cut short by ``--max-tokens``, becomes an ``error`` record and the run goes on;
``--retry-errors`` tries the inputs with an error record again (their old records are dropped first, in one atomic
rewrite of the file).  Exit status: 0 when every input has a record without error, 1 otherwise, 130 when stopped by
Ctrl-C (what was done is kept: run again to resume).
"""

import glob
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

from .errors import FastVLMError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}


def list_inputs(source: str, prompt: str | None) -> list[dict]:
    """The work items of ``--input`` (a folder, one image, a JSONL file, a text file of paths or a glob), each
    ``{"id", "image", "prompt"}``, in a stable order."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items = [{"id": str(p), "image": str(p)} for p in files]
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise FastVLMError(f"{path}:{n}: not valid JSON") from None
            items.append(_jsonl_item(row, f"{path}:{n}"))
    elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:  # one image
        items = [{"id": str(path), "image": str(path)}]
    elif path.is_file():
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise FastVLMError(f"{path}: not a text file of image paths (nor an image, JSONL file or folder)") from None
        items = [{"id": line, "image": line} for line in lines]
    elif any(c in source for c in "*?["):
        items = [{"id": p, "image": p} for p in sorted(glob.glob(source, recursive=True)) if os.path.isfile(p)]
    else:
        raise FastVLMError(f"{source}: no such directory, file or glob")
    seen = set()
    for item in items:
        if item["id"] in seen:
            raise FastVLMError(f"{source}: id {item['id']!r} appears more than once")
        seen.add(item["id"])
        item["prompt"] = item.get("prompt") or prompt
        if not item["prompt"]:
            raise FastVLMError(f"{source}: no prompt for {item['id']!r} (pass --prompt)")
    return items


def _jsonl_item(row, where: str) -> dict:
    """A JSONL row as a work item: an image, or a video with how to sample it."""
    if isinstance(row, dict) and isinstance(row.get("video"), str) and "image" not in row:
        for key, kind in (("frames", int), ("fps", (int, float))):
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value <= 0):
                raise FastVLMError(f"{where}: '{key}' must be a number above 0")
        if row.get("frames") is not None and row.get("fps") is not None:
            raise FastVLMError(f"{where}: give 'frames' or 'fps', not both")
        item = {"id": str(row.get("id", row["video"])), "video": row["video"], "prompt": row.get("prompt")}
        item.update((key, row[key]) for key in ("frames", "fps") if row.get(key) is not None)
        return item
    if not isinstance(row, dict) or not isinstance(row.get("image"), str):
        raise FastVLMError(f"{where}: each row needs an 'image' path (or a 'video' path)")
    return {"id": str(row.get("id", row["image"])), "image": row["image"], "prompt": row.get("prompt")}


def source_of(item: dict) -> dict:
    """What a record says of its input: the image, or the video and how it was sampled."""
    return {key: item[key] for key in ("image", "video", "frames", "fps") if key in item}


def read_records(data: bytes):
    """(id, line, record) of each whole JSON record in ``data``; a damaged line is passed over, so that
    input is simply done again."""
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
            yield str(record["id"]), line, record
        except (ValueError, KeyError, TypeError):
            continue


def done_ids(output: Path, retry_errors: bool = False) -> dict:
    """Ids already in ``output`` -> whether their record is an error; a torn last line is cut off first.

    With ``retry_errors`` the error records are removed (the file is rewritten beside itself and renamed
    over, so it is never half-written) and their ids are not returned: they are to be done again."""
    if not output.exists():
        return {}
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line the previous run did not finish writing
        with open(output, "r+b") as f:
            f.truncate(end)
    done = {i: "error" in record for i, _, record in read_records(data[:end])}
    if retry_errors and any(done.values()):
        kept = [line for i, line, record in read_records(data[:end]) if "error" not in record]
        tmp = output.with_name(output.name + ".retrying")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, output)
        done = {i: False for i, failed in done.items() if not failed}
    return done


def _decode_ahead(items: list[dict], out: "queue.Queue", stop: threading.Event, engine) -> None:
    """Decode image and video files on a background thread (PIL and PyAV release the GIL), ahead of the model;
    each item becomes its user message."""
    from .image import load_image
    from .video import video_turn

    for item in items:
        if stop.is_set():
            return
        try:
            if "video" in item:
                message = video_turn(item["prompt"], item["video"], item.get("frames"), item.get("fps"), engine)
            else:
                parts = [
                    {"type": "image", "image": load_image(item["image"])},
                    {"type": "text", "text": item["prompt"]},
                ]
                message = {"role": "user", "content": parts}
            out.put((item, message, None))
        except FastVLMError as e:
            out.put((item, None, str(e)))
    out.put(None)


def caption(
    engine, items: list[dict], sampling: dict, batch_size: int, write, constraint=None, system: str | None = None
) -> None:
    """Answer every item with batched decoding; ``write(record)`` is called as each one finishes.  Under a
    ``constraint`` (``structured.Constraint``) each answer matches it, and its sequence gets the grammar through
    ``Sampling.constraint``.  ``system`` is the system prompt (None: the default one; "": none).  A record's
    ``ttft_ms`` runs from its admission (image encode and prefill, with those of the items admitted beside it) to
    its first token."""
    from .engine import Sampling
    from .processor import DEFAULT_SYSTEM

    system = (DEFAULT_SYSTEM if system is None else system) or None
    decoder = engine.decoder(max_batch=batch_size)
    decoded: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    stop = threading.Event()
    reader = threading.Thread(target=_decode_ahead, args=(items, decoded, stop, engine), daemon=True)
    reader.start()
    running, exhausted = {}, False
    try:
        while running or not exhausted:
            ready = []
            while not exhausted and len(running) + len(ready) < batch_size:
                try:
                    entry = decoded.get(timeout=0.05 if running or ready else None)
                except queue.Empty:
                    break
                if entry is None:
                    exhausted = True
                    break
                item, message, error = entry
                if error is None:
                    try:
                        ready.append((item, engine.prepare([message], system)))
                    except FastVLMError as e:
                        error = str(e)
                if error is not None:
                    write({"id": item["id"], **source_of(item), "prompt": item["prompt"], "error": error})
            if ready:
                options = Sampling(**sampling, constraint=constraint.grammar if constraint else None)
                admitted_at = time.perf_counter()
                for (item, _), admitted in zip(ready, decoder.admit([(p, options) for _, p in ready])):
                    running[admitted.uid] = (item, admitted, [], [admitted_at])
            for t in decoder.step():
                item, admitted, text, times = running[t.uid]
                if not text:
                    times.append(time.perf_counter())
                text.append(t.text)
                if t.error is not None:  # its logits overflowed: an error record, retried by --retry-errors
                    del running[t.uid]
                    write({"id": item["id"], **source_of(item), "prompt": item["prompt"], "error": t.error})
                elif t.finish_reason is not None:
                    del running[t.uid]
                    ttft_ms = (times[1] - times[0]) * 1e3
                    write(_record(item, admitted, t, "".join(text), constraint, sampling["max_tokens"], ttft_ms))
    finally:
        stop.set()


def _record(item: dict, admitted, last, text: str, constraint, max_tokens: int, ttft_ms: float | None = None) -> dict:
    """The record of a finished answer; under a constraint, with its value (``json``, for a schema), or an
    error record when it ended before it matched."""
    from .cli import cut_short
    from .structured import StructuredOutputError

    record = {"id": item["id"], **source_of(item), "prompt": item["prompt"]}
    if constraint is not None and last.finish_reason == "length":
        return {**record, "error": cut_short(constraint, max_tokens, last.generation_tokens)}
    record.update(
        text=text,
        finish_reason=last.finish_reason,
        prompt_tokens=admitted.prompt_tokens,
        generation_tokens=last.generation_tokens,
    )
    if ttft_ms is not None:
        record["ttft_ms"] = round(ttft_ms, 3)
    if constraint is not None and constraint.is_json:
        try:
            record["json"] = constraint.parse(text, last.finish_reason)
        except StructuredOutputError as e:
            return {**record, "error": str(e)}
    return record


def _caption_all(
    model_path,
    source,
    output,
    prompt,
    sampling,
    batch_size,
    loaded=None,
    cluster=None,
    retry_errors=False,
    dtype=None,
    constraint=None,
    adapter_path=None,
) -> int:
    """The whole run of one process, or of one data-parallel rank (``cluster``): list the inputs, skip
    those already answered, caption the rest, summarize; returns the exit status."""
    from tqdm import tqdm

    from .cli import report_interrupt, warnings_above
    from .engine import engine_for
    from .loader import load

    items = list_inputs(source, prompt)
    if cluster is None:
        done, target, mine = done_ids(output, retry_errors), output, items
    else:  # what rank 0's output holds and this rank's part file adds; this rank's share of the inputs
        check_same_inputs(items, cluster)
        done = cluster.share(done_ids(output, retry_errors) if cluster.leader else None)
        target, mine = part_path(output, cluster), items[cluster.rank :: cluster.size]
        done.update(done_ids(target, retry_errors))
    todo = [item for item in mine if item["id"] not in done]
    counts = [0, 0, len(mine) - len(todo)]  # answered, failed, already done
    start = time.perf_counter()
    if todo:
        model, processor = loaded or load(model_path, dtype=dtype, adapter_path=adapter_path)
        start = time.perf_counter()  # images/s is for captioning, not for loading the model
        target.parent.mkdir(parents=True, exist_ok=True)
        quiet = cluster is not None and not cluster.leader  # one progress bar: rank 0's share
        interrupted = False
        with (
            open(target, "a", encoding="utf-8") as out,
            tqdm(
                total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True, disable=True if quiet else None
            ) as bar,
            warnings_above(bar),
        ):

            def write(record: dict) -> None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                done[record["id"]] = "error" in record
                counts[1 if "error" in record else 0] += 1
                bar.update(1)
                bar.set_postfix(done=counts[0], failed=counts[1])

            try:
                caption(engine_for(model, processor), todo, sampling, batch_size, write, constraint)
            except KeyboardInterrupt:
                if cluster is not None:
                    raise
                interrupted = True  # every record written so far is whole and flushed
        if interrupted:
            return report_interrupt(
                f"{counts[0]} answered and {counts[1]} failed in this run are in {output}; "
                "run the same command again to resume"
            )
    finished = done  # what the output held, and what this run added
    if cluster is not None:
        finished = merge_parts(output, target, items, cluster)
        counts = cluster.sum_counts(counts)
    elapsed = time.perf_counter() - start
    failed = None
    if cluster is None or cluster.leader:
        failed = sum(1 for item in items if finished.get(item["id"], True))
        ranks = "" if cluster is None else f" (merged from {cluster.size} ranks)"
        print(
            f"{counts[0]} answered, {counts[1]} failed, {counts[2]} already in {output}{ranks}; "
            f"{(counts[0] + counts[1]) / elapsed if elapsed and counts[0] + counts[1] else 0:.3g} images/s; "
            f"{failed} input(s) with errors in total" + (" (--retry-errors tries them again)" if failed else ""),
            file=sys.stderr,
        )
    if cluster is not None:
        failed = cluster.share(failed)
    return 1 if failed else 0


def check_same_inputs(items: list[dict], cluster) -> None:
    """Data parallel: every rank must list the very same inputs, or the shares would overlap or miss some."""
    import hashlib

    digest = hashlib.blake2b("\n".join(item["id"] for item in items).encode(), digest_size=16).hexdigest()
    expected = cluster.share(digest if cluster.leader else None)
    mismatch = cluster.sum_counts([int(digest != expected)])[0]
    if mismatch:
        raise FastVLMError(
            f"--input lists different files on {mismatch} rank(s) than on rank 0 "
            "(every rank must see the same inputs at the same paths)"
        )


def part_path(output: Path, cluster) -> Path:
    """Where one data-parallel rank appends its own records until rank 0 merges them."""
    return output.with_name(f"{output.name}.rank{cluster.rank}-of-{cluster.size}")


def merge_parts(output: Path, part: Path, items: list[dict], cluster) -> dict:
    """Data parallel: every rank's part file to rank 0 over the group (the ranks may not share a disk),
    which rewrites ``output`` in input order, atomically; then each rank drops its part.  Returns, on
    rank 0, every id of the merged output -> whether its record is an error ({} elsewhere)."""
    mine = part.read_bytes() if part.exists() else b""
    mine = mine[: mine.rfind(b"\n") + 1]
    gathered = cluster.gather_bytes(mine)
    finished = {}
    if cluster.leader:
        records = {}
        for chunk in [output.read_bytes() if output.exists() else b""] + gathered:
            for i, line, record in read_records(chunk):
                records[i] = line
                finished[i] = "error" in record
        order = {item["id"]: n for n, item in enumerate(items)}
        ids = sorted(records, key=lambda i: (i in order, order.get(i, 0)))  # ids of other inputs first, as they were
        tmp = output.with_name(output.name + ".merging")
        tmp.write_text("".join(records[i] + "\n" for i in ids), encoding="utf-8")
        os.replace(tmp, output)
    cluster.barrier()  # the merged file is in place before any part goes
    part.unlink(missing_ok=True)
    return finished


def main(argv: list[str] | None = None) -> int:
    """The ``fastvlm-batch`` command; returns the exit status (console scripts exit with it)."""
    import typer

    from . import distributed
    from .cli import (
        adapter_path_option,
        connect_timeout_option,
        dtype_option,
        model_option,
        parallel_option,
        report_interrupt,
        run_ranked,
        sampling_options,
        structured_options,
        use_one_line_warnings,
    )
    from .errors import exit_on_user_error

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    status = {"code": 0}

    @app.command(help="Caption or question every image of a folder, glob, list or JSONL file into a JSONL file.")
    @exit_on_user_error
    @structured_options
    @sampling_options
    def run(
        model_path: str = model_option(),
        dtype: str | None = dtype_option(),
        adapter_path: str | None = adapter_path_option(),
        source: str = typer.Option(..., "--input", "-i", help="Directory, glob, text file of paths, or JSONL file."),
        output: Path = typer.Option(..., "--output", "-o", help="JSONL file the records are appended to."),
        prompt: str = typer.Option(
            "Describe the image.", "--prompt", "-p", help="Prompt for inputs without their own."
        ),
        batch_size: int = typer.Option(8, "--batch-size", help="Images encoded and decoded together."),
        retry_errors: bool = typer.Option(
            False, "--retry-errors", help="Try the inputs whose record in --output is an error again."
        ),
        parallel: str = parallel_option(
            "data",
            "Under mlx.launch: 'data' (each rank answers its share of the inputs with the whole model), "
            "or split the decoder: 'tensor' or 'pipeline'. Ignored in a single process.",
        ),
        connect_timeout: float = connect_timeout_option(),
        sampling: dict | None = None,
        constraint=None,
    ):
        if batch_size < 1:
            raise FastVLMError(f"--batch-size must be at least 1 (got {batch_size})")
        if output.is_dir():
            raise FastVLMError(f"{output}: is a directory; --output names the JSONL file to write")
        options = dict(retry_errors=retry_errors, dtype=dtype, constraint=constraint, adapter_path=adapter_path)
        cluster = distributed.start(parallel, connect_timeout, allowed=("data",) + distributed.MODEL_PARALLEL)
        if cluster is None or not cluster.splits_model:  # alone, or a data-parallel rank: the model loads if needed
            status["code"] = _caption_all(
                model_path, source, output, prompt, sampling, batch_size, cluster=cluster, **options
            )
            return

        def lead(engine) -> int:
            loaded = (engine.model, engine.processor)
            return _caption_all(model_path, source, output, prompt, sampling, batch_size, loaded, **options)

        status["code"] = (
            run_ranked(
                lead, model_path, parallel, connect_timeout, cluster=cluster, dtype=dtype, adapter_path=adapter_path
            )
            or 0
        )

    try:
        stopped = app(args=argv, standalone_mode=False)  # typer gives 130 for a Ctrl-C it caught
    except SystemExit as e:
        return int(e.code or 0)
    except KeyboardInterrupt:
        stopped = 130
    except Exception as e:
        if type(e).__name__ == "Abort":  # how older typer (click) reports a Ctrl-C
            stopped = 130
        elif hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):  # click's usage errors
            e.show()
            return e.exit_code
        else:
            raise
    if stopped == 130:  # before the captioning began (while loading, say)
        return report_interrupt()
    return status["code"]
