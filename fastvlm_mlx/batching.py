"""Continuous batching: many requests decoding together, each with its own sampling, for the server
and the batch captioner.

The engine prepares each request and prefills it (images of requests admitted together go through the
vision tower in one call), reusing the longest prefix any earlier request left in a prompt cache
bounded in bytes (mlx-lm's ``LRUPromptCache``, keyed by prompt positions, images by pixel digest).
The prefilled KV caches then join mlx-lm's ``BatchGenerator``, which decodes them as one batch; a
finished sequence's cache (prompt and answer) goes back into the prompt cache for the next turn.

Everything here runs on one thread (MLX evaluation is not shared across threads).
"""

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from .engine import PREFILL_STEP, Engine, Prompt, Sampling, SharedPromptCache, check_finite
from .errors import NonFiniteLogitsError
from .mlx_thread import runs_on_mlx_thread

DEFAULT_PROMPT_CACHE_BYTES = 1 << 30


@dataclass
class Admitted:
    """What is known about a request once it is prefilled and decoding."""

    uid: int
    prompt_tokens: int
    cached_tokens: int
    vision_ms: float
    positions: list[Hashable] = field(repr=False, default_factory=list)


@dataclass
class Token:
    """One decode step of one sequence: ``text`` is the new text it adds (the rest of it when the sequence
    finishes), ``generation_tokens`` the answer's length so far; an end-of-turn token adds neither."""

    uid: int
    token: int
    logprobs: mx.array
    text: str
    eos: bool
    generation_tokens: int
    finish_reason: str | None
    error: str | None = None  # why the sequence was dropped (finish_reason "error")


@dataclass
class _Sequence:
    admitted: Admitted
    detokenizer: object
    fed: list[int] = field(default_factory=list)  # every token the KV cache took, end-of-turn ones included
    processed: bool = False  # whether logits processors act on its logits
    answer_tokens: int = 0


class BatchDecoder:
    """Every method runs on the MLX thread (``mlx_thread``), whichever thread calls it."""

    @runs_on_mlx_thread
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 8,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        prefill_step: int = PREFILL_STEP,
    ):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.processor.tokenizer
        # a pipeline stage holds some of the layers: its budget scales, so every rank evicts the same entries
        prompt_cache_bytes = (
            prompt_cache_bytes
            * len(self.model.language_model.layers)
            // self.model.config.text_args().num_hidden_layers
        )
        eos = sorted(self.tokenizer.eos_token_ids)
        self.generator = BatchGenerator(
            self.model, stop_tokens=[[t] for t in eos], completion_batch_size=max_batch, prefill_batch_size=max_batch
        )
        self.prompt_cache = SharedPromptCache(self.model, prompt_cache_bytes)
        self.prefill_step = prefill_step
        self.running: dict[int, _Sequence] = {}

    def __len__(self) -> int:
        return len(self.running)

    @runs_on_mlx_thread
    def admit(self, requests: Sequence[tuple]) -> list[Admitted]:
        """Prefill ``(Prompt, Sampling)`` pairs and add them to the batch; returns one Admitted each."""
        start = time.perf_counter()
        pixels, digests = [], []
        for prompt, _ in requests:
            pixels += prompt.pixels
            digests += prompt.digests
        encoded = dict(zip(digests, self.engine.image_source(pixels, digests))) if digests else {}
        vision_ms = (time.perf_counter() - start) * 1e3
        return [self._admit_one(prompt, sampling, encoded, vision_ms) for prompt, sampling in requests]

    def _admit_one(self, prompt: Prompt, sampling: Sampling, encoded: dict, vision_ms: float) -> Admitted:
        begun = self.engine.begin(prompt, self.prompt_cache, encoded, self.prefill_step)
        positions = begun.positions
        processors = sampling.processors(self.tokenizer)
        budget = sampling.budget(len(positions), self.engine.processor.context_length)  # stop at the context
        (uid,) = self.generator.insert(
            [[begun.last_id]],
            max_tokens=[budget],
            caches=[begun.kv],
            samplers=[sampling.sampler()],
            logits_processors=[processors],
        )
        admitted = Admitted(uid, len(positions), begun.cached, vision_ms, positions)
        self.running[uid] = _Sequence(admitted, self.tokenizer.detokenizer, processed=bool(processors))
        return admitted

    @runs_on_mlx_thread
    def step(self) -> list[Token]:
        """One decode step of every running sequence (the first token of a new one included)."""
        if not self.running:
            return []
        out = []
        for r in self.generator.next_generated():
            seq = self.running.get(r.uid)
            if seq is None:
                continue
            try:
                check_finite(r.logprobs, r.token, self.engine.dtype, seq.processed)
            except NonFiniteLogitsError as e:  # this sequence ends with the error; the batch goes on
                if r.finish_reason is None:
                    self.generator.remove([r.uid])
                self.running.pop(r.uid)
                out.append(Token(r.uid, r.token, r.logprobs, "", False, seq.answer_tokens, "error", str(e)))
                continue
            seq.fed.append(r.token)
            eos = r.token in self.tokenizer.eos_token_ids
            if not eos:
                seq.detokenizer.add_token(r.token)
                seq.answer_tokens += 1
            if r.finish_reason is not None:
                seq.detokenizer.finalize()
            text = seq.detokenizer.last_segment
            out.append(Token(r.uid, r.token, r.logprobs, text, eos, seq.answer_tokens, r.finish_reason))
            if r.finish_reason is not None:
                self._finish(r.uid, r.prompt_cache)
        return out

    @runs_on_mlx_thread
    def cancel(self, uid: int) -> None:
        """Drop a sequence from the batch now (a client went away, or a stop string matched)."""
        if uid in self.running:
            caches = self.generator.remove([uid], return_prompt_caches=True)
            self._finish(uid, caches.get(uid, (None,))[0])

    def _finish(self, uid: int, kv) -> None:
        seq = self.running.pop(uid)
        if kv:
            self.prompt_cache.store(seq.admitted.positions + seq.fed, kv)
        if not self.running:
            mx.clear_cache()  # idle: freed buffers go back to the system

    @property
    def cache_bytes(self) -> int:
        return self.prompt_cache.nbytes
