"""Generation API: ``generate`` and ``stream_generate`` (the CLI is ``fastvlm_mlx/generate.py``).

The token loop, samplers, KV cache and streaming detokenizer are mlx-lm's; this
module encodes the image, splices it into the prompt embeddings and times the
vision encode and the first token.
"""

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
    logits_processors: Optional[list] = None,
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
        image_embeds = model.encode_image(mx.concatenate(pixels).astype(model.vision_tower.dtype))
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
    processors += logits_processors or []
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
