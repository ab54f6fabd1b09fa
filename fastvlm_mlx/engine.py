"""The generation engine: one request in, tokens out, with every step named once.

    messages -> render + tokenize (processor)  -> Prompt (ids with image slots, pixels, image digests)
    Prompt   -> encode images (ImageFeatureCache in front of the tower, misses in one batched call)
             -> splice image embeddings into the token embeddings (model.embed_prompt)
             -> prefill the positions a PromptCache does not already hold, then decode (mlx-lm)

Every front-end (``generate``/``stream_generate`` below, ``ChatSession``, the CLIs) goes through
``Engine.stream``; the token loop, samplers, KV cache and streaming detokenizer are mlx-lm's.
"""

import dataclasses
import hashlib
import itertools
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse as LMResponse
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from .errors import FastVLMError, NonFiniteLogitsError
from .lm_internals import generation_stream, wired_limit
from .mlx_thread import runs_on_mlx_thread, streams_on_mlx_thread
from .model import IMAGE_PLACEHOLDER, FastVLM
from .processor import DEFAULT_SYSTEM, FastVLMProcessor, one_turn
from .structured import KEYWORDS as STRUCTURED_KEYWORDS
from .structured import GrammarMask, pop_constraint

DEFAULT_IMAGE_CACHE_BYTES = 256 << 20  # ~280 images of the 0.5B model in float32, ~75 of the 7B in float16
PREFILL_STEP = 2048  # positions per prefill call, mlx-lm's default
SHARED_ENGINE = "_fastvlm_engine"  # where engine_for keeps a model's engine


@dataclass
class GenerationResponse(LMResponse):
    """mlx-lm's response plus what a vision-language request adds.

    ``prompt_tokens`` counts every prompt position (image positions included), ``cached_tokens`` those
    of them that came from the prompt cache; ``vision_ms`` is the image encode (near 0 when every image
    came from the image-feature cache or the prompt cache); ``ttft_ms`` runs from preprocessed pixels
    to the first generated token (image file decoding is not in it).
    """

    vision_ms: float = 0.0
    ttft_ms: float = 0.0
    cached_tokens: int = 0


@dataclass
class Sampling:
    """How one request picks its tokens; the samplers and penalties are mlx-lm's."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None
    logits_processors: list[Callable] = field(default_factory=list)
    constraint: str | None = None  # an llguidance grammar every answer must match (structured.Constraint.grammar)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise FastVLMError(f"max_tokens must be at least 1 (got {self.max_tokens})")

    def sampler(self):
        """mlx-lm's sampling chain (top-p, min-p, top-k, temperature) drawing from a random key of this
        request's own, so a seed gives the same tokens in every front-end, alone or in any batch, and
        the global random state is left alone."""
        if self.temperature == 0:
            return lambda logprobs: mx.argmax(logprobs, axis=-1)
        state = {"key": mx.random.key(self.seed if self.seed is not None else time.time_ns() % (1 << 63))}

        def sample(logprobs: mx.array) -> mx.array:
            if 0 < self.top_p < 1.0:
                logprobs = apply_top_p(logprobs, self.top_p)
            if self.min_p:
                logprobs = apply_min_p(logprobs, self.min_p)
            if self.top_k > 0:
                logprobs = apply_top_k(logprobs, self.top_k)
            state["key"], key = mx.random.split(state["key"])
            return mx.random.categorical(logprobs * (1 / self.temperature), key=key)

        return sample

    def seeded(self) -> "Sampling":
        """A copy with a seed drawn now where it had none, so that another process can draw the same tokens."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=time.time_ns() % (1 << 63))

    def fields(self) -> dict:
        """The plain fields (no logits processors: those are code, and cannot be sent to another process)."""
        return {k: v for k, v in asdict(self).items() if k != "logits_processors"}

    def budget(self, prompt_positions: int, context_length: int) -> int:
        """The most tokens this request may generate: ``max_tokens``, cut to what the context leaves."""
        return max(1, min(self.max_tokens, context_length - prompt_positions))

    def processors(self, tokenizer) -> list:
        """The logits processors of one sequence, made fresh for it (a grammar's matcher holds the sequence's
        state): penalties, the caller's own, and last the grammar's mask, so that nothing re-admits a token
        the grammar forbids."""
        penalties = make_logits_processors(
            repetition_penalty=self.repetition_penalty, repetition_context_size=self.repetition_context_size
        )
        grammar = [GrammarMask(tokenizer, self.constraint)] if self.constraint else []
        return penalties + list(self.logits_processors) + grammar


def check_finite(logprobs: mx.array, token: int, dtype: mx.Dtype, processed: bool = False) -> None:
    """Raise a clear error, instead of streaming garbage, when the logits overflowed ``dtype``.

    A NaN or infinite logit makes the log-softmax non-finite at the sampled token too, so one element
    tells.  mlx-lm takes the log-softmax after the logits processors, so with ``processed`` the message
    also names them (a bias too large for ``dtype`` overflows the same way)."""
    if np.isfinite(logprobs.reshape(-1)[token].item()):
        return
    name = str(dtype).rsplit(".", 1)[-1]
    if dtype == mx.float32:
        advice = "the checkpoint's weights may be damaged"
    elif dtype == mx.bfloat16:
        advice = "load it with dtype='float32' (--dtype float32)"
    else:
        advice = "load it with dtype='bfloat16' (--dtype bfloat16) or 'float32'"
    cause = " (or a logits processor's values overflowed it)" if processed else ""
    raise NonFiniteLogitsError(f"the model's logits are not finite (NaN or inf) in {name}{cause}: {advice}")


def image_digest(pixels: mx.array) -> str:
    """Identity of a preprocessed image by its content, so a changed file at the same path is a new image."""
    data = np.asarray(pixels, dtype=np.float32)
    digest = hashlib.blake2b(str(data.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(data).data)
    return digest.hexdigest()


@dataclass
class Prompt:
    """A rendered, tokenized prompt: ``ids`` hold one IMAGE_PLACEHOLDER per image, in order."""

    ids: list[int]
    pixels: list[mx.array]
    digests: list[str]
    image_tokens: int  # positions per image

    def __len__(self) -> int:
        return len(self.ids) + len(self.pixels) * (self.image_tokens - 1)

    def positions(self) -> list[Hashable]:
        """One key per position: the token id, or (image digest, index) inside an image."""
        keys: list[Hashable] = []
        images = iter(self.digests)
        for t in self.ids:
            if t == IMAGE_PLACEHOLDER:
                digest = next(images)
                keys.extend((digest, j) for j in range(self.image_tokens))
            else:
                keys.append(t)
        return keys

    def shareable(self) -> dict:
        """What a follower rank needs of the prompt: the ids and the image identities, not the pixels."""
        return {"ids": self.ids, "digests": self.digests, "image_tokens": self.image_tokens}

    @classmethod
    def from_shareable(cls, fields: dict) -> "Prompt":
        """A follower's copy of the leader's prompt: no pixels (the leader sends the embeddings)."""
        return cls(fields["ids"], [None] * len(fields["digests"]), fields["digests"], fields["image_tokens"])

    def image_spans(self) -> list[range]:
        """The positions each image occupies."""
        spans, offset = [], 0
        for t in self.ids:
            if t == IMAGE_PLACEHOLDER:
                spans.append(range(offset, offset + self.image_tokens))
                offset += self.image_tokens
            else:
                offset += 1
        return spans


class ImageFeatureCache:
    """Projected image embeddings by image digest, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, mx.array] = OrderedDict()
        self.resize(max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> mx.array | None:
        found = self._entries.get(digest)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(digest)
        return found

    def put(self, digest: str, embeds: mx.array) -> None:
        if embeds.nbytes > self.max_bytes or digest in self._entries:
            return
        self._entries[digest] = embeds
        self.nbytes += embeds.nbytes
        self._evict()

    def resize(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise FastVLMError(f"the image cache size must be >= 0 bytes (got {max_bytes})")
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


class PrefixCache:
    """What both decode paths ask of a prompt cache: a KV cache already holding a prefix of a prompt, and,
    once the answer is done, that KV cache back with the positions it then holds."""

    def fetch(self, positions: Sequence[Hashable]) -> tuple[list, int]:
        """(kv, n): a KV cache holding the first ``n`` of ``positions``, with ``n < len(positions)``."""
        raise NotImplementedError

    def store(self, positions: Sequence[Hashable], kv: list) -> None:
        """``kv`` holds ``positions`` (or a prefix of them, when generation stopped early)."""
        raise NotImplementedError


def trim_to(kv: list, n: int) -> bool:
    """Cut the KV cache back to its first ``n`` positions; False when it cannot be cut (e.g. a rotating cache
    that already dropped them)."""
    extra = kv[0].offset - n if kv else 0
    return extra <= 0 or (can_trim_prompt_cache(kv) and trim_prompt_cache(kv, extra) == extra)


def fresh_kv(kv: list) -> list:
    """Empty caches of the same kinds."""
    return [type(c)() for c in kv]


class PromptCache(PrefixCache):
    """One conversation's KV cache together with the positions it holds, so a later prompt that shares a
    prefix with them prefills only what follows (images compare by content digest)."""

    _keys = itertools.count()

    def __init__(self, model: FastVLM, kv: list | None = None, positions: Sequence[Hashable] = ()):
        self.key = next(self._keys)  # names this cache's counterpart on follower ranks
        self.kv = kv if kv is not None else make_prompt_cache(model)
        self.positions: list[Hashable] = list(positions)

    @property
    def offset(self) -> int:
        return self.kv[0].offset if self.kv else 0

    def fetch(self, positions: Sequence[Hashable]) -> tuple[list, int]:
        """Keep the longest prefix shared with ``positions`` (at least the last position is left to compute,
        which gives the first logits) and drop the rest."""
        shared = 0
        for held, wanted in zip(self.positions, positions):
            if held != wanted:
                break
            shared += 1
        shared = min(shared, len(positions) - 1, self.offset)
        if not trim_to(self.kv, shared):
            self.kv, shared = fresh_kv(self.kv), 0
        self.positions = self.positions[:shared]
        return self.kv, shared

    def store(self, positions: Sequence[Hashable], kv: list) -> None:
        self.kv = kv
        self.positions = list(positions)[: self.offset]
        trim_to(self.kv, len(self.positions))


class SharedPromptCache(PrefixCache):
    """Prefixes shared by many requests (a system prompt, earlier turns, an image already seen), bounded in
    bytes: mlx-lm's ``LRUPromptCache`` keyed by prompt positions."""

    MODEL_KEY = "fastvlm"  # LRUPromptCache keys entries by model; one cache serves one model

    def __init__(self, model: FastVLM, max_bytes: int):
        self.model = model
        self.entries = LRUPromptCache(max_size=1 << 20, max_bytes=max_bytes)

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes

    def fetch(self, positions: Sequence[Hashable]) -> tuple[list, int]:
        kv, rest = self.entries.fetch_nearest_cache(self.MODEL_KEY, list(positions))
        if kv is None:
            return make_prompt_cache(self.model), 0
        cached = min(len(positions) - len(rest), len(positions) - 1)
        if not trim_to(kv, cached):
            return make_prompt_cache(self.model), 0
        return kv, cached

    def store(self, positions: Sequence[Hashable], kv: list) -> None:
        if kv and trim_to(kv, len(positions)) and kv[0].offset == len(positions):
            self.entries.insert_cache(self.MODEL_KEY, list(positions), kv)


def prefill(model: FastVLM, kv: list, ids: Sequence[int], embeddings: mx.array, step: int = PREFILL_STEP) -> None:
    """The one prefill: feed ``embeddings`` (positions, hidden) into ``kv``, ``step`` positions a call, on
    mlx-lm's generation stream inside its wired limit (``ids`` are the positions' token ids; the decoder reads
    the embeddings)."""
    if not len(ids):
        return
    with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
        for i in range(0, len(ids), step):
            chunk = embeddings[i : i + step]
            model(mx.array(ids[i : i + step])[None], cache=kv, input_embeddings=chunk[None])
            mx.eval([c.state for c in kv])
    mx.clear_cache()  # the prefill's activations are transient


@dataclass
class Started:
    """A sequence prefilled up to its last prompt position, which the decoder computes first."""

    kv: list
    positions: list[Hashable]
    cached: int  # positions that came from the prefix cache
    last_id: int
    last_embedding: mx.array  # (1, hidden)
    vision_ms: float


class Engine:
    """Prompt preparation, image encoding with its cache, and decoding, for one loaded model."""

    def __init__(self, model: FastVLM, processor: FastVLMProcessor, image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        self.model = model
        self.processor = processor
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        # where embed() takes image embeddings from: the vision tower through the cache here; a rank of a
        # model split over processes takes them from the leader instead (distributed.Replica, Follower)
        self.image_source: Callable[[Sequence, Sequence[str]], list[mx.array]] = self.encode_images

    @property
    def dtype(self) -> mx.Dtype:
        """What the decoder computes in."""
        return self.model.language_model.model.norm.weight.dtype

    # ------------------------------------------------------------------ 1. render and tokenize
    def prepare(self, messages: Sequence[dict], system: str | None = DEFAULT_SYSTEM) -> Prompt:
        """Render the conversation, tokenize it, preprocess its images and check it fits the context."""
        ids, images, positions = self._tokens(messages, system)
        self.processor.check_length(positions)
        pixels = [self.processor.preprocess(image) for image in images]
        return Prompt(ids, pixels, [image_digest(p) for p in pixels], self.model.config.num_image_tokens)

    def positions(self, messages: Sequence[dict], system: str | None = DEFAULT_SYSTEM) -> int:
        """The context positions the conversation takes (each image its share of them), as ``prepare`` counts
        them; its images are not looked at, so stand-ins will do."""
        return self._tokens(messages, system)[2]

    def _tokens(self, messages: Sequence[dict], system: str | None) -> tuple[list[int], list, int]:
        text, images = self.processor.render(messages, system)
        ids = self.processor.encode(text)
        return ids, images, len(ids) + len(images) * (self.model.config.num_image_tokens - 1)

    # -------------------------------------------------------------------- 2. encode images
    @runs_on_mlx_thread
    def encode_images(self, pixels: Sequence[mx.array], digests: Sequence[str]) -> list[mx.array]:
        """Projected embeddings (N, hidden) per image: from the cache, the misses in one tower call."""
        found = {d: self.image_cache.get(d) for d in dict.fromkeys(digests)}
        missing = [d for d, e in found.items() if e is None]
        if missing:
            first = {d: p for d, p in zip(digests, pixels)}
            batch = mx.concatenate([first[d] for d in missing]).astype(self.model.vision_tower.dtype)
            with wired_limit(self.model, [generation_stream]):
                embeds = self.model.encode_image(batch)
                per_image = [embeds[i] for i in range(len(missing))]
                mx.eval(per_image)
            del embeds, batch
            mx.clear_cache()  # the tower's activations are transient: hand them back, not to Metal's buffer cache
            for d, e in zip(missing, per_image):
                found[d] = e
                self.image_cache.put(d, e)
        return [found[d] for d in digests]

    # ------------------------------------------------------------------------- 3. splice
    def embed(self, prompt: Prompt, start: int = 0, encoded: dict | None = None) -> mx.array:
        """Input embeddings of positions ``start:``; images wholly before ``start`` are not encoded.

        ``encoded`` maps digests to embeddings already computed (several requests encoded together)."""
        needed = [i for i, span in enumerate(prompt.image_spans()) if span.stop > start]
        if encoded is not None and all(prompt.digests[i] in encoded for i in needed):
            encoded = [encoded[prompt.digests[i]] for i in needed]
        else:
            encoded = self.image_source([prompt.pixels[i] for i in needed], [prompt.digests[i] for i in needed])
        hidden = self.model.config.text_args().hidden_size
        filler = mx.zeros((prompt.image_tokens, hidden))  # stands in for an image already in the cache
        per_image = [filler] * len(prompt.pixels)
        for i, e in zip(needed, encoded):
            per_image[i] = e
        image_embeds = mx.stack(per_image) if per_image else None
        return self.model.embed_prompt(prompt.ids, image_embeds)[start:]

    # ---------------------------------------------------------------- 4. prefill and decode
    def begin(
        self, prompt: Prompt, cache: PrefixCache, encoded: dict | None = None, step: int = PREFILL_STEP
    ) -> Started:
        """Both decode paths start here: take what ``cache`` holds of the prompt, encode the images the rest
        needs, and prefill all of it but the last position, which the decoder computes with the first token."""
        positions = prompt.positions()
        kv, cached = cache.fetch(positions)
        start = time.perf_counter()
        embeddings = self.embed(prompt, cached, encoded)
        vision_ms = (time.perf_counter() - start) * 1e3
        filler = self.processor.tokenizer.pad_token_id or 0  # an id for image positions (the embeddings are read)
        ids = [t if isinstance(t, int) else filler for t in positions[cached:]]
        prefill(self.model, kv, ids[:-1], embeddings[:-1], step)
        return Started(kv, positions, cached, ids[-1], embeddings[-1:], vision_ms)

    @streams_on_mlx_thread
    def stream(
        self, prompt: Prompt, sampling: Sampling, cache: PromptCache | None = None, **generate_kwargs
    ) -> Iterator[GenerationResponse]:
        """Prefill what ``cache`` does not hold and decode through mlx-lm; ``cache`` is updated in place.

        Extra keyword arguments go to mlx-lm's ``generate_step`` (e.g. ``kv_bits``).
        """
        if cache is None:  # a one-off request: a KV cache of its own, as mlx-lm would make
            cache = PromptCache(self.model, make_prompt_cache(self.model, generate_kwargs.get("max_kv_size")))
        start = time.perf_counter()
        begun = self.begin(prompt, cache)
        positions, generated, ttft_ms = begun.positions, [], None
        processors = sampling.processors(self.processor.tokenizer)
        context = self.processor.context_length
        budget = sampling.budget(len(positions), context)
        try:
            for r in lm_stream_generate(
                self.model,
                self.processor.tokenizer,
                mx.array([begun.last_id]),
                max_tokens=budget,
                sampler=sampling.sampler(),
                logits_processors=processors,
                input_embeddings=begun.last_embedding,
                prompt_cache=begun.kv,
                **generate_kwargs,
            ):
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - start) * 1e3
                    computed = len(positions) - begun.cached
                    prompt_tps = computed / max(ttft_ms / 1e3 - begun.vision_ms / 1e3, 1e-9)
                check_finite(r.logprobs, r.token, self.dtype, bool(processors))
                generated.append(r.token)
                if r.finish_reason == "length" and budget < sampling.max_tokens:
                    warnings.warn(
                        f"the answer stopped at the model's context of {context} positions "
                        f"(the prompt took {len(positions)}; max_tokens was {sampling.max_tokens})",
                        stacklevel=2,
                    )
                yield GenerationResponse(
                    **dict(asdict(r), prompt_tokens=len(positions), prompt_tps=prompt_tps),
                    vision_ms=begun.vision_ms,
                    ttft_ms=ttft_ms,
                    cached_tokens=begun.cached,
                )
        finally:  # also when the caller stops early: the cache holds what was fed, and says so
            cache.store(positions + generated, begun.kv)
            mx.clear_cache()  # between requests, freed buffers go back to the system

    def forget(self, cache: PromptCache) -> None:
        """A conversation's cache is no longer needed: nothing to do here (``distributed.Replica`` tells the
        other ranks, whose counterparts of it can go)."""

    def decoder(self, **options):
        """A batched decoder over this engine (``batching.BatchDecoder``'s options)."""
        from .batching import BatchDecoder

        return BatchDecoder(self, **options)


def engine_for(model: FastVLM, processor: FastVLMProcessor, image_cache_bytes: int | None = None) -> Engine:
    """The model's shared engine (and so its image-feature cache), made on first use.

    ``image_cache_bytes`` bounds the image-feature cache (default 256 MiB; 0 disables it).  On the leader of
    a model split over ranks, the shared engine is the ``distributed.Replica`` that ``follow_or_lead`` set.
    """
    engine = model.__dict__.get(SHARED_ENGINE)
    if engine is None or engine.processor is not processor:
        engine = share_engine(Engine(model, processor))
    if image_cache_bytes is not None:
        engine.image_cache.resize(image_cache_bytes)
    return engine


def share_engine(engine):
    """Make ``engine`` the one ``engine_for`` gives for its model (kept beside the model's modules, never
    saved); returns it."""
    engine.model.__dict__[SHARED_ENGINE] = engine
    return engine


# ------------------------------------------------------------------------- one-shot front-end
def stream_generate(
    model: FastVLM,
    processor: FastVLMProcessor,
    prompt: str | None = None,
    image=None,
    *,
    messages: Sequence[dict] | None = None,
    system: str | None = DEFAULT_SYSTEM,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    logits_processors: list | None = None,
    prompt_cache: PromptCache | None = None,
    video=None,
    frames: int | None = None,
    fps: float | None = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield text segments as they are generated.

    Either ``prompt`` (one user turn) with ``image`` (one image, a list of images, or None), or
    ``messages=[{"role": ..., "content": str | [parts]}, ...]`` (see ``FastVLMProcessor.render``).
    ``video`` (a video file's path or bytes) adds its frames to the prompt's turn, ``frames`` of them spread
    evenly (8 by default) or ``fps`` a second, each with its time (``fastvlm_mlx.video``).
    ``prompt_cache`` (a ``PromptCache``) carries a KV cache from one call to the next.

    Structured output (``structured.constrain``): ``response_format=`` (OpenAI's shape, or a pydantic model
    class), or one of ``schema=`` (a JSON Schema dict or a pydantic model class), ``regex=``, ``choices=``
    (a list of strings) and ``grammar=`` (Lark); the answer then matches it.  Other keyword arguments go to
    mlx-lm's ``generate_step`` (e.g. ``kv_bits``).
    """
    constraint = pop_constraint(kwargs)
    engine = engine_for(model, processor)
    if messages is not None and (prompt is not None or image is not None or video is not None):
        raise FastVLMError("pass either prompt (and image or video) or messages, not both")
    if video is not None:
        from .video import video_turn

        messages = [video_turn(prompt, video, frames, fps, engine, images=image, system=system)]
    elif frames is not None or fps is not None:
        raise FastVLMError("frames and fps sample a video: pass video= too")
    elif messages is None:
        messages = one_turn(prompt, image)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        seed=seed,
        logits_processors=list(logits_processors or []),
        constraint=constraint.grammar if constraint else None,
    )
    yield from engine.stream(engine.prepare(messages, system), sampling, prompt_cache, **kwargs)


def generate(model: FastVLM, processor: FastVLMProcessor, prompt: str | None = None, image=None, **kwargs) -> str:
    """The whole answer as one string; keyword arguments as for ``stream_generate``."""
    return "".join(r.text for r in stream_generate(model, processor, prompt, image, **kwargs))


def parse(model: FastVLM, processor: FastVLMProcessor, prompt: str | None = None, image=None, **kwargs):
    """The answer as a value: with ``schema=SomeModel`` an instance of that pydantic model, with a JSON Schema
    dict the decoded JSON, with ``regex``/``choices``/``grammar`` the text.  Keyword arguments as for
    ``stream_generate``; one structured-output keyword is required.  Raises ``StructuredOutputError`` when
    ``max_tokens`` cut the answer short."""
    constraint = pop_constraint(kwargs)
    if constraint is None:
        raise FastVLMError(f"parse needs one of {', '.join(STRUCTURED_KEYWORDS)}")
    responses = list(stream_generate(model, processor, prompt, image, response_format=constraint, **kwargs))
    return constraint.parse("".join(r.text for r in responses), responses[-1].finish_reason)
