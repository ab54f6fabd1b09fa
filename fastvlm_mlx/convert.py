"""``python -m fastvlm_mlx.convert``: any FastVLM checkpoint -> an MLX model directory (flags as mlx-lm's convert)."""

import sys
from pathlib import Path
from typing import List, Optional

from .errors import exit_on_user_error


def main(argv: Optional[List[str]] = None) -> int:
    import typer
    from tqdm import tqdm

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Convert Apple, transformers or mlx-vlm FastVLM checkpoints to fastvlm-mlx's MLX format.")
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
    ):
        from convert import convert_checkpoint

        from .loader import resolve_path

        src = resolve_path(hf_path)
        steps = ["reading checkpoint", "building model", "writing", "done"]
        # disable=None: a bar on terminals only, so logs and error output stay clean
        with tqdm(total=len(steps) + quantize, desc="converting", unit="step", file=sys.stderr, disable=None) as bar:

            def progress(step: str) -> None:
                bar.set_postfix_str(step)
                if step != "reading checkpoint":
                    bar.update(1)

            convert_checkpoint(
                src,
                mlx_path,
                dtype=dtype,
                quantize_bits=q_bits if quantize else None,
                group_size=q_group_size,
                quantize_projector=quantize_projector,
                force=force,
                progress=progress,
            )
        print(f"wrote {mlx_path}", file=sys.stderr)

    app(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
