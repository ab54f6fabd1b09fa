"""``python -m fastvlm_mlx.fuse``: a model with its fine-tuned adapters folded into its weights (flags as mlx-lm's
fuse), written atomically as a model directory of this project's format, or as Apple's app folder.

The adapters' LoRA and DoRA layers are fused by mlx-lm's own ``fuse``.  Over a quantized base the fused weights are
quantized again with the base's settings, unless ``--de-quantize`` writes the whole model in floating point.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from fastvlm_mlx.errors import FastVLMError, exit_on_user_error

from .writer import DTYPES, SIDE_FILES, atomic_directory, check_destination, copy_present, save_weights


def fuse_model(model_path: str, adapter_path: str, dequantize: bool = False, dtype: str | None = None):
    """(the fused FastVLM, the base model's directory): the base read strictly in its stored dtype, the adapters
    put on and fused, optionally every quantized layer made plain and the model cast to ``dtype``."""
    from mlx_lm.utils import dequantize_model

    from fastvlm_mlx.adapters import apply_adapters, fuse_adapters, read_adapters
    from fastvlm_mlx.checkpoints import read_checkpoint
    from fastvlm_mlx.loader import build_model, resolve_path

    if dtype is not None and dtype not in DTYPES:
        raise FastVLMError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    adapters = read_adapters(adapter_path)  # a bad adapter folder fails before the slow read
    src = resolve_path(model_path)
    config, weights = read_checkpoint(src)
    model = build_model(config, weights, str(src))
    del weights
    apply_adapters(model, adapters)
    fuse_adapters(model, dequantize=dequantize)
    if dequantize:
        dequantize_model(model)
        model.config.quantization = None
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    return model, src


def write_model(model, src: Path, dst: Path, force: bool = False) -> None:
    """The fused model as a directory of this project's format (config, weights, the base's tokenizer files)."""
    with atomic_directory(dst, force) as tmp:
        save_weights(dict(tree_flatten(model.parameters())), tmp)
        config = model.config.to_dict()
        config["torch_dtype"] = str(model.language_model.model.norm.weight.dtype).removeprefix("mlx.core.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_present(src, tmp, SIDE_FILES)


def write_app_bundle(model, src: Path, dst: Path, force: bool = False, coreml_precision: str = "float16") -> None:
    """The fused model as the model folder of Apple's FastVLM app (``convert --app-bundle``'s writer)."""
    from .app_bundle import export_app_bundle

    with atomic_directory(dst, force) as tmp:
        export_app_bundle(model, src, tmp, coreml_precision, warn=lambda m: print(f"warning: {m}", file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    import typer

    from fastvlm_mlx.cli import use_one_line_warnings

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Fuse fine-tuned adapters into the model and save it (as mlx_lm.fuse does).")
    @exit_on_user_error
    def run(
        model_path: str = typer.Option(..., "--model", "-m", help="Base model directory or Hugging Face repo id."),
        adapter_path: str = typer.Option("adapters", "--adapter-path", help="Folder of the fine-tuned adapters."),
        save_path: Path = typer.Option(Path("fused_model"), "--save-path", help="Where to write the fused model."),
        dequantize: bool = typer.Option(
            False, "--de-quantize", "--dequantize", help="Write a quantized base's layers in floating point."
        ),
        dtype: str | None = typer.Option(
            None, "--dtype", help="float16, bfloat16 or float32 (default: the base model's own)."
        ),
        app_bundle: bool = typer.Option(
            False,
            "--app-bundle",
            help="Write --save-path as the model folder of Apple's FastVLM app (as convert --app-bundle does).",
        ),
        coreml_precision: str = typer.Option(
            "float16", "--coreml-precision", help="With --app-bundle: the CoreML encoder's precision."
        ),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty destination."),
    ):
        check_destination(save_path, force)
        if app_bundle:
            from .coreml import PRECISIONS, require_coremltools

            require_coremltools()  # fail before anything is read
            if coreml_precision not in PRECISIONS:
                raise FastVLMError(
                    f"--coreml-precision must be one of {', '.join(PRECISIONS)} (got {coreml_precision})"
                )
        model, src = fuse_model(model_path, adapter_path, dequantize, dtype)
        if app_bundle:
            write_app_bundle(model, src, save_path, force, coreml_precision)
        else:
            write_model(model, src, save_path, force)
        print(f"wrote {save_path}", file=sys.stderr)

    app(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
