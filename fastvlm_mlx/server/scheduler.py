"""The generation thread: admits queued requests into ``BatchDecoder``, decodes every running request one token a
step, and sends each request typed events (``Delta``, ``Finished``, ``Failed``) on its own asyncio queue.

Its thread waits for requests; each step (prefill what arrived, decode, deliver) runs on the package's MLX thread
(``mlx_thread``), as every other MLX call of the process does. Stop strings, log-probabilities and usage are
worked out here, where the tokens are.
"""

import asyncio
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ContextLengthError, FastVLMError, lost_peer
from .config import ServerConfig
from .metrics import Metrics
from .protocol import APIError, Timings, TokenLogprob, ToolCallShape, TopLogprob, Usage

if TYPE_CHECKING:
    from ..batching import Admitted


@dataclass
class ParsedRequest:
    """A checked request, as the scheduler takes it: engine messages (images decoded) and ``Sampling``'s fields."""

    messages: list
    sampling: dict
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)
    tool_call: ToolCallShape | None = None  # the answer is a forced tool call, read back this way


# ------------------------------------------------------------------------------------------ events
@dataclass
class Delta:
    """More of the answer: text past what was sent (stop-string candidates held back), and its tokens' logprobs."""

    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    usage: Usage
    timings: Timings | None = None


@dataclass
class Failed:
    error: APIError


Event = Delta | Finished | Failed


# ------------------------------------------------------------------------------------------- state
@dataclass
class Job:
    """A request waiting for, or in, the batch; the event loop reads its events, the scheduler writes them."""

    request: ParsedRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    created: float = field(default_factory=time.perf_counter)  # when the server received the request
    cancelled: bool = False  # set by the event loop when the client goes away


@dataclass
class RequestState:
    """A job in the batch: what the decoder admitted, the text so far, and what of it was sent."""

    job: Job
    admitted: "Admitted"
    prompt_ms: float = 0.0  # the prefill of the admission it came in with
    text: str = ""
    sent: int = 0
    steps: int = 0  # decode steps so far (an end-of-turn token included)
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def visible_text(text: str, stops: list[str], finished: bool):
    """The text up to the first stop string, less a tail that could still become one; and whether a stop matched."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    if finished:
        return text, False
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


class Scheduler:
    """Admits queued jobs, decodes them in a batch, streams events back."""

    def __init__(self, engine, cfg: ServerConfig, metrics: Metrics):
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self.decoder = engine.decoder(max_batch=cfg.max_batch, prompt_cache_bytes=cfg.prompt_cache_bytes)
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=cfg.max_queue)
        self.running: dict[int, RequestState] = {}  # decoder uid -> state
        self.admitting: list[Job] = []
        self.alive = True
        self.stopping = False
        self.failure: str | None = None  # why the loop ended, when the server must end with it
        self.thread = threading.Thread(target=self._run, name="fastvlm-generation", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the step in progress and end the loop (and let follower ranks go)."""
        self.stopping = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():  # stuck in a step: say so, rather than leave the exit unexplained
            print(f"warning: the generation loop did not stop within {timeout:g} s", file=sys.stderr, flush=True)

    def submit(self, job: Job) -> None:
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise APIError(
                429, "the server is busy (request queue full); retry shortly", None, "queue_full",
                "rate_limit_error", {"Retry-After": "1"},
            ) from None  # fmt: skip

    def gauges(self) -> dict:
        """The queue, the batch and the caches, for /metrics."""
        cache = self.engine.image_cache
        return dict(
            queue_depth=self.pending.qsize(),
            running_batch_size=len(self.running),
            image_cache_hits_total=cache.hits,
            image_cache_misses_total=cache.misses,
            image_cache_bytes=cache.nbytes,
            prompt_cache_bytes=self.decoder.cache_bytes,
        )

    @staticmethod
    def _send(job: Job, event: Event) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _run(self) -> None:
        from .. import mlx_thread

        try:
            while not self.stopping:
                mlx_thread.run(self._advance, self._take(block=not self.running))
            cluster = getattr(self.decoder, "cluster", None)  # a distributed.ReplicatedDecoder's
            if cluster is not None:
                cluster.close()
        except BaseException as e:  # the loop must never die silently: /health reports it
            self.alive = False
            stopped = APIError(500, f"the generation loop stopped ({type(e).__name__})", kind="server_error")
            for job in self.admitting + [state.job for state in self.running.values()]:
                self._send(job, Failed(stopped))
            while not self.pending.empty():
                self._send(
                    self.pending.get_nowait(), Failed(APIError(503, "the generation loop stopped", kind="server_error"))
                )
            if not lost_peer(e):
                raise
            # a rank of a split model is gone: nothing more can be generated, so the server ends
            self.failure = f"lost another rank of the distributed group, which stopped or crashed ({e})"
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    def _take(self, block: bool) -> list[Job]:
        """The queued jobs that fit in the batch; waits a little for one when nothing is running."""
        batch = []
        try:
            job = self.pending.get(timeout=0.5) if block else self.pending.get_nowait()
            while True:
                batch.append(job)
                if len(batch) + len(self.running) >= self.cfg.max_batch:
                    break
                job = self.pending.get_nowait()
        except queue.Empty:
            pass
        return batch

    def _advance(self, batch: list[Job]) -> None:
        """One step, on the MLX thread: admit ``batch``, drop cancelled jobs, decode and deliver a token each."""
        self._admit(batch)
        self._reap_cancelled()
        for t in self.decoder.step():
            self._deliver(t)

    def _admit(self, batch: list[Job]) -> None:
        from ..engine import Sampling
        from ..structured import GrammarMask, StructuredOutputError

        ready = []
        self.admitting = batch
        for job in batch:
            if job.cancelled:
                self.metrics.cancelled()
                continue
            try:
                prompt = self.engine.prepare(job.request.messages)  # the default system message unless one is given
                sampling = Sampling(**job.request.sampling)
                if sampling.constraint:  # a grammar this vocabulary cannot serve fails here, alone, not in the batch
                    GrammarMask(self.engine.processor.tokenizer, sampling.constraint)
                ready.append((job, prompt, sampling))
            except ContextLengthError as e:
                self._send(job, Failed(APIError(400, str(e), "messages", "context_length_exceeded")))
            except StructuredOutputError as e:
                self._send(job, Failed(APIError(400, str(e))))
            except FastVLMError as e:
                self._send(job, Failed(APIError(400, str(e), "messages")))
        if ready:
            start = time.perf_counter()
            admitted = self.decoder.admit([(p, s) for _, p, s in ready])
            admit_ms = (time.perf_counter() - start) * 1e3
            for (job, _, _), a in zip(ready, admitted):
                self.running[a.uid] = RequestState(job, a, prompt_ms=max(admit_ms - a.vision_ms, 0.0))
        self.admitting = []

    def _reap_cancelled(self) -> None:
        for uid, state in list(self.running.items()):
            job = state.job
            if job.cancelled or time.perf_counter() - job.created > self.cfg.request_timeout:
                self.decoder.cancel(uid)
                self.running.pop(uid)
                if job.cancelled:
                    self.metrics.cancelled()
                else:
                    self._send(job, Failed(APIError(504, "the request timed out", None, "timeout", "server_error")))

    def _deliver(self, t) -> None:
        state = self.running.get(t.uid)
        if state is None:
            return
        job, request = state.job, state.job.request
        if t.error is not None:  # the sequence was dropped (its logits overflowed): this request fails alone
            self.running.pop(t.uid)
            self._send(job, Failed(APIError(500, t.error, None, "non_finite_logits", "server_error")))
            return
        state.steps += 1
        if state.first_token_at is None:
            state.first_token_at = time.perf_counter()
            self.metrics.observe("ttft_seconds", state.first_token_at - job.created)
        if request.logprobs and not t.eos:
            state.logprobs.append(self._logprob_entry(t, request.top_logprobs))
        state.text += t.text
        visible, stopped = visible_text(state.text, request.stop, t.finish_reason is not None)
        delta, state.sent = visible[state.sent :], len(visible)
        entries, state.logprobs = state.logprobs, []
        if delta or entries:
            self._send(job, Delta(delta, entries))
        if t.finish_reason is None and not stopped:
            return
        if t.finish_reason is None:  # a stop string ended it: the decoder still holds the sequence
            self.decoder.cancel(t.uid)
        self.running.pop(t.uid)
        a = state.admitted
        self.metrics.add_tokens(a.prompt_tokens, a.cached_tokens, t.generation_tokens)
        reason = "stop" if stopped or t.finish_reason != "length" else "length"
        usage = Usage.of(a.prompt_tokens, a.cached_tokens, t.generation_tokens)
        self._send(job, Finished(reason, usage, self._timings(state)))

    @staticmethod
    def _timings(state: RequestState) -> Timings:
        decoding = time.perf_counter() - state.first_token_at
        return Timings(
            ttft_ms=round((state.first_token_at - state.job.created) * 1e3, 3),
            vision_ms=round(state.admitted.vision_ms, 3),
            prompt_ms=round(state.prompt_ms, 3),
            tokens_per_second=round((state.steps - 1) / decoding, 3) if state.steps > 1 and decoding > 0 else 0.0,
            cached_tokens=state.admitted.cached_tokens,
        )

    def _logprob_entry(self, t, top: int) -> TokenLogprob:
        import mlx.core as mx

        tok = self.engine.processor.tokenizer

        def entry(i, lp, cls=TopLogprob):
            s = tok.decode([i])
            return cls(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

        out = entry(t.token, t.logprobs[t.token].item(), TokenLogprob)
        if top:
            ids = mx.argsort(-t.logprobs)[:top].tolist()
            values = t.logprobs[mx.array(ids)].tolist()
            out.top_logprobs = [entry(i, v) for i, v in zip(ids, values)]
        return out
