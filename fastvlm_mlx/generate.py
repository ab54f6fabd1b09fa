"""``python -m fastvlm_mlx.generate``: ask FastVLM about one or more images, streaming the answer to stdout.

With ``--schema FILE``, ``--regex`` or ``--choices`` the answer matches it; one cut short by ``--max-tokens``
is printed as far as it got, then an error (exit status 1), since it does not match."""

import sys
import types

from .engine import GenerationResponse, stream_generate
from .errors import FastVLMError, exit_on_user_error
from .processor import DEFAULT_SYSTEM


def _stats_line(r: GenerationResponse) -> str:
    return (
        f"vision {r.vision_ms:.1f} ms | TTFT {r.ttft_ms:.1f} ms | "
        f"prompt {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory {r.peak_memory:.2f} GB"
    )


def main(argv: list[str] | None = None) -> int:
    import typer

    from .cli import (
        adapter_path_option,
        connect_timeout_option,
        dtype_option,
        image_argument,
        model_option,
        parallel_option,
        run_ranked,
        sampling_options,
        structured_options,
        use_one_line_warnings,
    )

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Answer a prompt about an image (or a text-only prompt) with FastVLM.")
    @exit_on_user_error
    @structured_options
    @sampling_options
    def run(
        prompt: str = typer.Option(..., "--prompt", "-p", help="What to ask."),
        image: list[str] | None = typer.Option(
            None,
            "--image",
            "-i",
            help="Image file or http(s) URL; repeat for several images, omit for a text-only prompt.",
        ),
        model_path: str = model_option(),
        dtype: str | None = dtype_option(),
        adapter_path: str | None = adapter_path_option(),
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt ('' for none)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Print timing and memory to stderr."),
        vision_backend: str = typer.Option(
            "mlx", "--vision-backend", help="mlx, or coreml (macOS: the model directory's fastvithd.mlpackage)."
        ),
        parallel: str = parallel_option(),
        connect_timeout: float = connect_timeout_option(),
        sampling: dict = None,
        constraint=None,
    ):
        images = [image_argument(i) for i in image or []]  # a bad image fails before the model loads
        run_ranked(
            lambda engine: _answer(
                engine.model, engine.processor, prompt, images, system, verbose, sampling, constraint
            ),
            model_path,
            parallel,
            connect_timeout,
            dtype=dtype,
            vision_backend=vision_backend,
            adapter_path=adapter_path,
        )

    app(args=argv)
    return 0


def _answer(model, processor, prompt, image, system, verbose, sampling, constraint=None) -> None:
    from .cli import cut_short

    last = None
    for last in stream_generate(
        model,
        processor,
        prompt,
        image or None,
        system=system or None,
        response_format=constraint,
        **sampling,
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and last is not None:
        print(_stats_line(last), file=sys.stderr)
    if constraint is not None and last is not None and last.finish_reason == "length":
        raise FastVLMError(cut_short(constraint, sampling["max_tokens"], last.generation_tokens))


class _CommandAndFunction(types.ModuleType):
    """``fastvlm_mlx.generate`` names both the API function and this command's module, and importing the module
    (as the ``fastvlm-generate`` script does) rebinds the package's attribute to it: calling the module calls
    the function, so ``from fastvlm_mlx import generate`` works either way."""

    def __call__(self, *args, **kwargs):
        from .engine import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CommandAndFunction

if __name__ == "__main__":
    sys.exit(main())
