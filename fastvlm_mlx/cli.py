"""What the command lines share: the common options, one set of sampling flags, the structured-output flags,
the ranked run, image arguments, one-line warnings.

Every command (generate, chat, batch, server) takes the sampling flags from ``sampling_options``, so their
names and defaults are the same everywhere, and the defaults are those of ``engine.Sampling``, which the
Python API uses too; generate, chat and batch take ``--schema``/``--regex``/``--choices`` from
``structured_options`` (compiled by ``structured``; the command puts the grammar in ``Sampling.constraint``).
``run_ranked`` is what a command that loads a model does, alone or as one rank of several: a new command is
its options and the function its leader runs.
"""

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
import typing
import warnings
from collections.abc import Callable
from typing import TypeVar

from .errors import FastVLMError

T = TypeVar("T")

# name -> (flags, help); types and defaults come from engine.Sampling
SAMPLING_FLAGS = {
    "max_tokens": (("--max-tokens",), "Most tokens to generate per answer (fewer if the model's context ends first)."),
    "temperature": (("--temperature", "--temp"), "Sampling temperature; 0 means greedy."),
    "top_p": (("--top-p",), "Sample from the most likely tokens up to this total probability (1 keeps all)."),
    "top_k": (("--top-k",), "Sample from the k most likely tokens only (0 keeps all)."),
    "min_p": (("--min-p",), "Drop tokens less likely than min-p times the most likely one (0 keeps all)."),
    "repetition_penalty": (("--repetition-penalty",), "Penalize tokens of the last 20 (e.g. 1.1; off by default)."),
    "seed": (("--seed",), "Random seed, for the same samples on every run (temperature > 0)."),
}
# name -> (flags, help): the structured-output flags (at most one), compiled by structured_constraint
STRUCTURED_FLAGS = {
    "schema": (("--schema",), "JSON Schema file: every answer is compact JSON that matches it."),
    "regex": (("--regex",), "Every answer matches this regular expression, whole (no look-around)."),
    "choices": (
        ("--choices",),
        "Every answer is one of these comma-separated strings, e.g. yes,no (for a choice with a comma, --regex).",
    ),
}
DTYPE_HELP = (
    "float32, float16 or bfloat16: what the model computes in (default: the checkpoint's own dtype on a "
    "GPU, float32 on the CPU)."
)
ADAPTER_PATH_HELP = (
    "Folder of fine-tuned adapters (adapter_config.json and adapters.safetensors, as fastvlm_mlx.lora writes "
    "them) to put on the model."
)
MAX_IMAGE_DOWNLOAD = 64 << 20
DOWNLOAD_TIMEOUT_S = 30.0


def sampling_defaults() -> dict:
    """The sampling fields every front-end exposes, with ``engine.Sampling``'s defaults."""
    from .engine import Sampling

    defaults = {f.name: f.default for f in dataclasses.fields(Sampling)}
    return {name: defaults[name] for name in SAMPLING_FLAGS}


def check_sampling(sampling: dict) -> dict:
    """Refuse out-of-range sampling values with a message naming the flag; returns ``sampling``."""
    from .engine import Sampling

    limits = {
        "temperature": (sampling["temperature"] >= 0, "at least 0"),
        "top_p": (0 <= sampling["top_p"] <= 1, "between 0 and 1"),
        "top_k": (sampling["top_k"] >= 0, "at least 0"),
        "min_p": (0 <= sampling["min_p"] <= 1, "between 0 and 1"),
        "repetition_penalty": (
            sampling["repetition_penalty"] is None or sampling["repetition_penalty"] > 0,
            "greater than 0",
        ),
        "max_tokens": (sampling["max_tokens"] >= 1, "at least 1"),
    }
    for name, (ok, bound) in limits.items():
        if not ok:
            raise FastVLMError(f"{SAMPLING_FLAGS[name][0][0]} must be {bound} (got {sampling[name]})")
    Sampling(**sampling)
    return sampling


def sampling_options(command):
    """Give a typer command the shared sampling flags; it receives them as one checked ``sampling`` dict."""
    from .engine import Sampling

    types = typing.get_type_hints(Sampling)
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=types[name],
            default=_option(default, *SAMPLING_FLAGS[name]),
        )
        for name, default in sampling_defaults().items()
    ]
    return _with_options(command, "sampling", added, check_sampling)


def structured_options(command):
    """Give a typer command ``--schema``, ``--regex`` and ``--choices``; it receives ``constraint``, the
    compiled ``structured.Constraint`` (None for free text), checked before the command's body runs, so a bad
    schema fails before the model loads."""
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=str | None,
            default=_option(None, *STRUCTURED_FLAGS[name], metavar=metavar),
        )
        for name, metavar in zip(STRUCTURED_FLAGS, ("FILE", "PATTERN", "A,B,..."))
    ]
    return _with_options(command, "constraint", added, lambda values: structured_constraint(**values))


def _with_options(command, keyword: str, added: list, combine: Callable[[dict], object]):
    """``command`` with the options ``added`` to its signature (for typer), passed to it as one argument,
    ``keyword``, made by ``combine`` from their values."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != keyword]
    names = [p.name for p in added]

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        return command(*args, **{keyword: combine(values)}, **kwargs)

    with_options.__signature__ = signature.replace(
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    )
    with_options.__annotations__ = {**command.__annotations__, **{p.name: p.annotation for p in added}}
    return with_options


def structured_constraint(schema: str | None = None, regex: str | None = None, choices: str | None = None):
    """The constraint ``--schema FILE``, ``--regex PATTERN`` or ``--choices a,b,c`` ask for (None when none
    is given); more than one is refused."""
    from .structured import from_regex

    given = [
        STRUCTURED_FLAGS[n][0][0] for n, v in dict(schema=schema, regex=regex, choices=choices).items() if v is not None
    ]
    if len(given) > 1:
        raise FastVLMError(f"give one of --schema, --regex and --choices, not {' and '.join(given)}")
    if schema is not None:
        return schema_file(schema)
    if regex is not None:
        return from_regex(regex)
    if choices is not None:
        return choices_list(choices)
    return None


def schema_file(path: str):
    """The constraint of a JSON Schema file (``--schema``, chat's ``/schema``); errors name the file."""
    from .structured import StructuredOutputError, from_schema

    if not path.strip():
        raise StructuredOutputError("--schema: give the path of a JSON Schema file")
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise StructuredOutputError(f"{path}: no such JSON Schema file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StructuredOutputError(f"{path}: cannot read the JSON Schema file ({getattr(e, 'strerror', e)})") from None
    try:
        return from_schema(text)
    except StructuredOutputError as e:
        raise StructuredOutputError(f"{path}: {e}") from None


def choices_list(value: str):
    """The constraint of ``--choices``: comma-separated strings, blanks around each one ignored."""
    from .structured import StructuredOutputError, from_choices

    options = [option.strip() for option in value.split(",")]
    if not all(options):
        raise StructuredOutputError(f"--choices: an empty choice in {value!r} (give them as a,b,c)")
    return from_choices(options)


def cut_short(constraint, max_tokens: int, generated_tokens: int) -> str:
    """What to say of a structured answer that ended (``finish_reason`` "length") before it was complete."""
    what = {"regex": "the regex", "choice": "one of the choices"}.get(constraint.kind, "the schema")
    if generated_tokens < max_tokens:
        return f"the answer reached the end of the model's context before it matched {what}"
    return f"the answer reached --max-tokens ({max_tokens}) before it matched {what}"


def model_option():
    """``--model``/``-m``, the same in every command that loads a model."""
    import typer

    from .loader import DEFAULT_MODEL

    return typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id.")


def dtype_option():
    """``--dtype``, the same in every command that loads a model."""
    import typer

    return typer.Option(None, "--dtype", help=DTYPE_HELP)


def adapter_path_option():
    """``--adapter-path``, the same in every command that loads a model."""
    import typer

    return typer.Option(None, "--adapter-path", help=ADAPTER_PATH_HELP)


def parallel_option(default: str = "tensor", help_text: str | None = None):
    """``--parallel``: how the ranks share the work under ``mlx.launch``."""
    import typer

    from .distributed import PARALLEL_HELP

    return typer.Option(default, "--parallel", help=help_text or PARALLEL_HELP)


def connect_timeout_option():
    """``--connect-timeout``: how long a rank waits for the others."""
    import typer

    from .distributed import CONNECT_HELP, DEFAULT_CONNECT_TIMEOUT

    return typer.Option(DEFAULT_CONNECT_TIMEOUT, "--connect-timeout", help=CONNECT_HELP)


def _option(default, flags, help_text, **options):
    import typer

    return typer.Option(default, *flags, help=help_text, **options)


# ------------------------------------------------------------------------------------ ranked run
def run_ranked(
    lead: Callable[..., T],
    model_path: str,
    parallel: str,
    connect_timeout: float,
    *,
    cluster=None,
    image_cache_bytes: int | None = None,
    **load_options,
) -> T | None:
    """Load the model and run ``lead(engine)`` on rank 0 (or in a single process); returns what it returns.

    Under ``mlx.launch`` the ranks join (``parallel``, ``connect_timeout``, unless a ``cluster`` already
    started is given) and each loads its part of the decoder; the other ranks then take rank 0's steps
    until ``lead`` ends, and return None.  ``load_options`` go to ``load`` (``dtype``, ``vision_backend``,
    ``adapter_path``);
    ``image_cache_bytes`` sizes the engine's image-feature cache."""
    from . import distributed
    from .engine import engine_for
    from .loader import load

    if cluster is None:
        cluster = distributed.start(parallel, connect_timeout)
    model, processor = load(model_path, cluster=cluster, **load_options)
    engine = engine_for(model, processor, image_cache_bytes=image_cache_bytes)
    if not distributed.follow_or_lead(cluster, engine):
        return None  # a follower rank: rank 0 reads the input and writes the output
    with distributed.leading(cluster):
        return lead(engine_for(model, processor))  # on the leader of a split model: the Replica follow_or_lead set


# ---------------------------------------------------------------------------------------- images
def image_argument(value: str):
    """An image named on the command line, checked now (before the model loads): a path, with ``~``
    expanded, is returned as a path; an http(s) URL is fetched and returned decoded."""
    from .image import load_image

    if value.startswith(("http://", "https://")):
        data = fetch_image(value)
        try:
            return load_image(data)
        except FastVLMError as e:
            raise FastVLMError(f"{value}: {str(e).removeprefix('image bytes: ')}") from None
    path = os.path.expanduser(value)
    load_image(path)
    return path


def fetch_image(url: str) -> bytes:
    """The bytes at an http(s) URL, with a timeout and a size cap."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "fastvlm-mlx"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_IMAGE_DOWNLOAD + 1)
    except urllib.error.HTTPError as e:
        raise FastVLMError(f"{url}: fetching the image gave HTTP {e.code} ({e.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # DNS, refused, timeout, malformed URL
        raise FastVLMError(f"{url}: could not fetch the image ({getattr(e, 'reason', None) or e})") from None
    if len(data) > MAX_IMAGE_DOWNLOAD:
        raise FastVLMError(f"{url}: the image is over {MAX_IMAGE_DOWNLOAD >> 20} MB")
    return data


# -------------------------------------------------------------------------------------- warnings
def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``warning: ...`` without the file, line number and source line Python adds for developers."""
    return f"warning: {' '.join(str(message).split())}\n"


def use_one_line_warnings() -> None:
    """Warnings of a command-line run print as one line each."""
    warnings.formatwarning = one_line_warning


@contextlib.contextmanager
def warnings_above(bar):
    """While a tqdm progress bar is drawn, print warnings above it instead of into it."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        bar.write(
            warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), file=file or sys.stderr
        )

    warnings.showwarning = show
    try:
        yield bar
    finally:
        warnings.showwarning = shown


def report_interrupt(what: str | None = None) -> int:
    """A command stopped by Ctrl-C: one line, and the shell's status for SIGINT."""
    print(f"interrupted{': ' + what if what else ''}", file=sys.stderr, flush=True)
    return 130
