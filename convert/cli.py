"""The converter command line, run as ``python -m fastvlm_mlx.convert`` (flags as mlx-lm's convert)."""

import sys
from pathlib import Path

from fastvlm_mlx.errors import FastVLMError, exit_on_user_error


def _export_coreml_only(src: Path, dst: Path, options: dict, force: bool) -> None:
    """--coreml-only: the vision encoder of any checkpoint -> a .mlpackage, nothing else."""
    import mlx.core as mx

    from fastvlm_mlx.loader import load_model

    from .coreml import PACKAGE_NAME, export_coreml

    package = dst if dst.suffix == ".mlpackage" else dst / PACKAGE_NAME
    if package.exists() and not force:
        raise FastVLMError(f"{package}: already exists (use --force to replace it)")
    model = load_model(src, mx.float32)
    export_coreml(model, package, force=force, **options)
    print(f"wrote {package}", file=sys.stderr)


# what the progress bar counts: each step is done when the next one begins ("done" ends the last)
STEPS = ("reading checkpoint", "building model", "writing")


def main(argv: list[str] | None = None) -> int:
    import typer
    from tqdm import tqdm

    from fastvlm_mlx.cli import use_one_line_warnings, warnings_above

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(
        help="Convert Apple, transformers or mlx-vlm FastVLM checkpoints to fastvlm-mlx's MLX format "
        "(or, with --app-bundle, to the model folder of Apple's FastVLM app)."
    )
    @exit_on_user_error
    def run(
        hf_path: str = typer.Option(..., "--hf-path", help="Local checkpoint directory or Hugging Face repo id."),
        mlx_path: Path = typer.Option(Path("mlx_model"), "--mlx-path", help="Where to write the MLX model."),
        dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16 or float32."),
        quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the language model."),
        q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight when quantizing (4 or 8 are usual)."),
        q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size."),
        quantize_projector: bool = typer.Option(False, "--quantize-projector", help="Quantize the projector too."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty destination."),
        coreml: bool = typer.Option(
            False,
            "--coreml",
            help="Also export the vision encoder as fastvithd.mlpackage (CoreML) next to the weights.",
        ),
        coreml_only: bool = typer.Option(
            False,
            "--coreml-only",
            help="Only export the CoreML vision encoder of --hf-path (any checkpoint, converted or not) to "
            "--mlx-path/fastvithd.mlpackage, or to --mlx-path itself if it ends in .mlpackage.",
        ),
        coreml_precision: str = typer.Option(
            "float16", "--coreml-precision", help="CoreML compute precision: float16 or float32."
        ),
        coreml_image_input: bool = typer.Option(
            False, "--coreml-image-input", help="Take an RGB image (CVPixelBuffer) instead of a float tensor in [0, 1]."
        ),
        coreml_include_projector: bool = typer.Option(
            False, "--coreml-include-projector", help="Run the projector in CoreML too (output image_embeddings)."
        ),
        coreml_resolution: int | None = typer.Option(
            None, "--coreml-resolution", help="Input size of the CoreML encoder (default: the model's image size)."
        ),
        app_bundle: bool = typer.Option(
            False,
            "--app-bundle",
            help="Write --mlx-path as the model folder of Apple's FastVLM app (app/FastVLM/model/): "
            "llava_qwen2 config, LLM and projector weights, tokenizer with <image>, fastvithd.mlpackage.",
        ),
    ):
        from fastvlm_mlx.loader import resolve_path

        from .writer import convert_checkpoint

        if app_bundle:
            given = {
                "--coreml": coreml,
                "--coreml-only": coreml_only,
                "--coreml-image-input": coreml_image_input,
                "--coreml-include-projector": coreml_include_projector,
                "--coreml-resolution": coreml_resolution is not None,
            }
            other = [flag for flag, on in given.items() if on]
            if other:
                raise FastVLMError(
                    f"--app-bundle writes the package the app expects (tensor input, model resolution, no projector); "
                    f"drop {', '.join(other)}"
                )
            coreml = True  # the bundle holds the encoder: same coremltools and precision checks as --coreml
        coreml_options = None
        if coreml or coreml_only:
            from .coreml import PRECISIONS, check_resolution, require_coremltools

            require_coremltools()  # fail before anything is read or written
            if coreml_precision not in PRECISIONS:
                raise FastVLMError(
                    f"--coreml-precision must be one of {', '.join(PRECISIONS)} (got {coreml_precision})"
                )
            if coreml_resolution is not None:
                check_resolution(coreml_resolution)
            coreml_options = dict(
                resolution=coreml_resolution,
                precision=coreml_precision,
                image_input=coreml_image_input,
                include_projector=coreml_include_projector,
            )
        src = resolve_path(hf_path)
        if coreml_only:
            _export_coreml_only(src, mlx_path, coreml_options, force)
            return
        write, write_options = convert_checkpoint, {}
        if app_bundle:
            from .app_bundle import convert_app_bundle

            write = convert_app_bundle
            write_options = dict(
                coreml_precision=coreml_precision, warn=lambda m: tqdm.write(f"warning: {m}", file=sys.stderr)
            )
        elif coreml_options is not None:
            from .coreml import PACKAGE_NAME, export_coreml

            def extra_export(model, directory: Path) -> None:
                export_coreml(model, directory / PACKAGE_NAME, **coreml_options)

            write_options = dict(extra_export=extra_export)

        # disable=None: a bar on terminals only, so logs and error output stay clean
        with (
            tqdm(total=len(STEPS) + quantize, desc="converting", unit="step", file=sys.stderr, disable=None) as bar,
            warnings_above(bar),
        ):

            def progress(step: str) -> None:
                if step != STEPS[0]:
                    bar.update(1)
                bar.set_postfix_str(step)

            write(
                src,
                mlx_path,
                dtype=dtype,
                quantize_bits=q_bits if quantize else None,
                group_size=q_group_size,
                quantize_projector=quantize_projector,
                force=force,
                progress=progress,
                **write_options,
            )
        print(f"wrote {mlx_path}", file=sys.stderr)

    app(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
