"""Generation: the Python API (``generate``, ``stream_generate``) and ``python -m fastvlm_mlx.generate``.

The token loop, samplers, KV cache and streaming detokenizer are mlx-lm's; this
module encodes the image, splices it into the prompt embeddings and times the
vision encode and the first token.
"""

import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as LMResponse
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import FastVLMError
from .model import IMAGE_PLACEHOLDER, FastVLM
from .processor import DEFAULT_SYSTEM, FastVLMProcessor


@dataclass
class GenerationResponse(LMResponse):
    """mlx-lm's response plus the image encode time and the time to first token, in milliseconds.

    ``ttft_ms`` runs from preprocessed pixels to the first generated token
    (vision encode + prefill + first sampling step); image file decoding is not in it.
    """

    vision_ms: float = 0.0
    ttft_ms: float = 0.0


def _as_list(image) -> list:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def stream_generate(
    model: FastVLM,
    processor: FastVLMProcessor,
    prompt: str,
    image=None,
    *,
    system: Optional[str] = DEFAULT_SYSTEM,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    seed: Optional[int] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield text segments as they are generated.  ``image``: one image, a list of images, or None (text only).

    Extra keyword arguments go to mlx-lm's ``generate_step`` (e.g. ``prompt_cache``, ``kv_bits``).
    """
    images = _as_list(image)
    if max_tokens < 1:
        raise FastVLMError(f"max_tokens must be at least 1 (got {max_tokens})")
    ids = processor.prompt_ids(prompt, len(images), model.config.num_image_tokens, system)
    pixels = [processor.preprocess(im) for im in images]
    if seed is not None:
        mx.random.seed(seed)

    start = time.perf_counter()
    image_embeds = None
    if pixels:
        dtype = model.vision_tower.stem.layers[0].weight.dtype
        image_embeds = model.encode_image(mx.concatenate(pixels).astype(dtype))
        mx.eval(image_embeds)
    vision_ms = (time.perf_counter() - start) * 1e3

    embeddings = model.embed_prompt(ids, image_embeds)
    # mlx-lm wants token ids alongside the embeddings (for repetition penalties); image positions get the pad id.
    filler = processor.tokenizer.pad_token_id or 0
    tokens: List[int] = []
    for t in ids:
        tokens.extend([filler] * model.config.num_image_tokens if t == IMAGE_PLACEHOLDER else [t])

    sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size)
    ttft_ms = None
    for response in lm_stream_generate(
        model,
        processor.tokenizer,
        mx.array(tokens),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        input_embeddings=embeddings,
        **kwargs,
    ):
        if ttft_ms is None:
            ttft_ms = (time.perf_counter() - start) * 1e3
        yield GenerationResponse(**asdict(response), vision_ms=vision_ms, ttft_ms=ttft_ms)


def generate(model: FastVLM, processor: FastVLMProcessor, prompt: str, image=None, **kwargs) -> str:
    """The whole answer as one string; keyword arguments as for ``stream_generate``."""
    return "".join(r.text for r in stream_generate(model, processor, prompt, image, **kwargs))


def _stats_line(r: GenerationResponse) -> str:
    return (
        f"vision {r.vision_ms:.1f} ms | TTFT {r.ttft_ms:.1f} ms | "
        f"prompt {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory {r.peak_memory:.2f} GB"
    )


def main(argv: Optional[List[str]] = None) -> int:
    import typer

    from .loader import DEFAULT_MODEL, load

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Answer a prompt about an image (or a text-only prompt) with FastVLM.")
    def run(
        prompt: str = typer.Option(..., "--prompt", "-p", help="What to ask."),
        image: Optional[str] = typer.Option(None, "--image", "-i", help="Image file; omit for a text-only chat."),
        model_path: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, "--temperature", "--temp", help="0 means greedy."),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k"),
        min_p: float = typer.Option(0.0, "--min-p"),
        repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt ('' for none)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Print timing and memory to stderr."),
    ):
        model, processor = load(model_path)
        last = None
        for last in stream_generate(
            model,
            processor,
            prompt,
            image,
            system=system or None,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        ):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if verbose and last is not None:
            print(_stats_line(last), file=sys.stderr)

    try:
        app(args=argv, standalone_mode=False)
    except FastVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
