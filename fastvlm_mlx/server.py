"""``python -m fastvlm_mlx.server``: an OpenAI-compatible chat-completions server over the engine.

HTTP handling (FastAPI + uvicorn) runs on the event loop; all MLX work runs on one generation thread
that admits queued requests, prefills them through the engine (images of requests that arrive
together in one vision-tower call, prefixes from the prompt cache) and decodes every running request
in one batch (``batching.BatchDecoder``), each with its own sampling, stop strings and token budget.
Requests are parsed and checked before they are queued; every error is an OpenAI error body.
"""

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlparse

from .errors import FastVLMError, lost_peer

# Fields of the chat-completions request that are implemented; any other non-null field is refused.
SUPPORTED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "logprobs", "top_logprobs", "top_k", "min_p", "repetition_penalty", "n", "user",
}
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    max_tokens_limit: int = 4096
    sampling: dict = field(default_factory=dict)  # defaults for what a request leaves out (cli.sampling_defaults)
    max_queue: int = 64
    max_batch: int = 8
    request_timeout: float = 600.0
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000
    allow_remote_images: bool = False
    allowed_image_dir: Optional[str] = None
    image_cache_bytes: int = 256 << 20
    prompt_cache_bytes: int = 1 << 30
    keepalive_s: float = 5.0
    remote_timeout_s: float = 10.0


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, offending parameter and code."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- images
def _open_checked(data: bytes, where: str, cfg: ServerConfig):
    """Decode image bytes, refusing oversized files and pixel counts before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    from .image import register_heif, unreadable_reason

    register_heif()  # HEIC/HEIF through pillow-heif
    if len(data) > cfg.max_image_bytes:
        raise APIError(400, f"{where}: image is {len(data)} bytes, over the limit of {cfg.max_image_bytes}", "messages")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > cfg.max_image_pixels:
            raise APIError(400, f"{where}: image declares {width}x{height} pixels, over the limit of "
                           f"{cfg.max_image_pixels}", "messages", "image_too_large")
        image.load()
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(400, f"{where}: image declares more pixels than the limit of {cfg.max_image_pixels} "
                       "(a possible decompression bomb)", "messages", "image_too_large") from None
    except UnidentifiedImageError:
        raise APIError(400, f"{where}: {unreadable_reason(data[:64])}", "messages", "invalid_image") from None
    except Exception as e:  # truncated and corrupt files raise many types
        raise APIError(400, f"{where}: image is truncated or corrupt ({type(e).__name__})", "messages",
                       "invalid_image") from None
    return image


def _fetch_remote(url: str, where: str, cfg: ServerConfig) -> bytes:
    """GET with a timeout and a size cap; redirects are followed only within the same host."""
    import httpx

    host = urlparse(url).hostname
    with httpx.Client(timeout=cfg.remote_timeout_s, follow_redirects=False) as client:
        for _ in range(4):
            with client.stream("GET", url) as response:
                if response.is_redirect:
                    target = urlparse(str(response.next_request.url)) if response.next_request else None
                    if target is None or target.hostname != host:
                        raise APIError(400, f"{where}: redirect to another host refused", "messages")
                    url = str(response.next_request.url)
                    continue
                if response.status_code != 200:
                    raise APIError(400, f"{where}: fetching the image gave HTTP {response.status_code}", "messages")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > cfg.max_image_bytes:
                        raise APIError(400, f"{where}: image is over the limit of {cfg.max_image_bytes} bytes", "messages")
                return bytes(data)
    raise APIError(400, f"{where}: too many redirects", "messages")


def load_image_url(url: str, where: str, cfg: ServerConfig):
    """An ``image_url`` part's URL -> a decoded PIL image."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: image_url needs a url", "messages")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise APIError(400, f"{where}: a data URL must be base64 (data:image/...;base64,...)", "messages")
        if len(payload) > cfg.max_image_bytes * 4 // 3 + 4:
            raise APIError(400, f"{where}: image is over the limit of {cfg.max_image_bytes} bytes", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the data URL", "messages") from None
        return _open_checked(data, where, cfg)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        if not cfg.allow_remote_images:
            raise APIError(400, f"{where}: remote image URLs are off (start the server with --allow-remote-images)", "messages")
        try:
            return _open_checked(_fetch_remote(url, where, cfg), where, cfg)
        except APIError:
            raise
        except Exception as e:  # network errors
            raise APIError(400, f"{where}: could not fetch the image ({type(e).__name__})", "messages") from None
    path = url[len("file://"):] if scheme == "file" else url
    if cfg.allowed_image_dir is None:
        raise APIError(400, f"{where}: local image files are off (start the server with --allowed-image-dir DIR)", "messages")
    root = Path(cfg.allowed_image_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise APIError(403, f"{where}: {path} is outside the allowed image directory", "messages", "forbidden_path")
    if not target.is_file():
        raise APIError(400, f"{where}: no such image file {path}", "messages")
    if target.stat().st_size > cfg.max_image_bytes:
        raise APIError(400, f"{where}: image is over the limit of {cfg.max_image_bytes} bytes", "messages")
    return _open_checked(target.read_bytes(), where, cfg)


# ------------------------------------------------------------------------------------ requests
@dataclass
class ParsedRequest:
    messages: list
    sampling: dict
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    stop: List[str] = field(default_factory=list)


def _number(body, name, kind, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name} must be between {low} and {high} (got {value})", name)
    return kind(value)


def parse_request(body, cfg: ServerConfig) -> ParsedRequest:
    """Check a chat-completions body and turn it into engine messages and sampling options."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(k for k, v in body.items() if k not in SUPPORTED and v is not None)
    if unknown:
        raise APIError(400, f"unsupported field(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise APIError(400, "n > 1 is not supported", "n", "unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    converted = [_message(m, i, cfg) for i, m in enumerate(messages)]
    max_tokens = _number(body, "max_completion_tokens", int) or _number(body, "max_tokens", int)
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None and _number(body, name, int) < 1:
            raise APIError(400, f"{name} must be at least 1", name)
    given = dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 0, 2),
        top_p=_number(body, "top_p", float, 0, 1),
        top_k=_number(body, "top_k", int, 0),
        min_p=_number(body, "min_p", float, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", float, 0),
        seed=_number(body, "seed", int),
    )
    from .cli import sampling_defaults

    defaults = {**sampling_defaults(), **cfg.sampling}
    sampling = {name: defaults[name] if value is None else value for name, value in given.items()}
    sampling["max_tokens"] = min(sampling["max_tokens"], cfg.max_tokens_limit)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise APIError(400, "stop must be a non-empty string or a list of up to 16 of them", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    top = _number(body, "top_logprobs", int, 0, 20) or 0
    return ParsedRequest(converted, sampling, bool(body.get("stream")), bool(options.get("include_usage")),
                         bool(body.get("logprobs")), top, stop)


def _message(message, i: int, cfg: ServerConfig) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object", "messages")
    role = message.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise APIError(400, f"{where}: unsupported role {role!r} (system, user or assistant)", "messages")
    extra = sorted(k for k, v in message.items() if k not in ("role", "content", "name") and v is not None)
    if extra:
        raise APIError(400, f"{where}: unsupported field(s) {', '.join(extra)}", "messages", "unsupported_parameter")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts", "messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append({"type": "image", "image": load_image_url(url, f"{where}.content[{j}]", cfg)})
        else:
            raise APIError(400, f"{where}.content[{j}]: unsupported part {kind!r} (text or image_url)", "messages")
    return {"role": role, "content": parts}


# --------------------------------------------------------------------------------- the worker
@dataclass
class Job:
    request: ParsedRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


class Metrics:
    """Prometheus counters, gauges and histograms, written in the text exposition format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}
        self.tokens = {"prompt": 0, "cached": 0, "generated": 0}
        self.hist = {"ttft_seconds": ([0] * (len(TTFT_BUCKETS) + 1), [0.0], TTFT_BUCKETS),
                     "request_latency_seconds": ([0] * (len(LATENCY_BUCKETS) + 1), [0.0], LATENCY_BUCKETS)}

    def count(self, status: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            counts, total, buckets = self.hist[name]
            counts[next((i for i, b in enumerate(buckets) if value <= b), len(buckets))] += 1
            total[0] += value

    def add_tokens(self, prompt: int, cached: int, generated: int) -> None:
        with self.lock:
            self.tokens["prompt"] += prompt
            self.tokens["cached"] += cached
            self.tokens["generated"] += generated

    def render(self, gauges: dict) -> str:
        with self.lock:
            lines = ["# TYPE fastvlm_requests_total counter"]
            lines += [f'fastvlm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            for kind, n in self.tokens.items():
                lines += [f"# TYPE fastvlm_{kind}_tokens_total counter", f"fastvlm_{kind}_tokens_total {n}"]
            for name, (counts, total, buckets) in self.hist.items():
                lines.append(f"# TYPE fastvlm_{name} histogram")
                running = 0
                for b, c in zip(list(buckets) + ["+Inf"], counts):
                    running += c
                    lines.append(f'fastvlm_{name}_bucket{{le="{b}"}} {running}')
                lines += [f"fastvlm_{name}_sum {total[0]:.6f}", f"fastvlm_{name}_count {running}"]
        for name, value in gauges.items():
            lines += [f"# TYPE fastvlm_{name} gauge", f"fastvlm_{name} {value}"]
        return "\n".join(lines) + "\n"


def memory_gauges() -> dict:
    """MLX's allocator (active, cached, peak) and the process's resident set, in bytes."""
    import mlx.core as mx

    gauges = dict(mlx_active_memory_bytes=mx.get_active_memory(), mlx_cache_memory_bytes=mx.get_cache_memory(),
                  mlx_peak_memory_bytes=mx.get_peak_memory())
    try:
        with open("/proc/self/statm") as f:
            gauges["resident_memory_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # macOS: the peak resident set is what getrusage gives (in bytes there)
        import resource

        gauges["resident_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return gauges


class GenerationLoop:
    """Admits queued jobs, decodes them in a batch, streams events back.

    Its thread waits for requests; each step (prefill what arrived, decode every running request one token,
    deliver) runs on the package's MLX thread (``mlx_thread``), as every other MLX call of the process does."""

    def __init__(self, engine, cfg: ServerConfig, metrics: Metrics):
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self.decoder = engine.decoder(max_batch=cfg.max_batch, prompt_cache_bytes=cfg.prompt_cache_bytes)
        self.pending: "queue.Queue[Job]" = queue.Queue(maxsize=cfg.max_queue)
        self.jobs = {}  # uid -> (job, state)
        self.admitting: List[Job] = []
        self.alive = True
        self.stopping = False
        self.failure: Optional[str] = None  # why the loop ended, when the server must end with it
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
            raise APIError(429, "the server is busy (request queue full); retry shortly", None, "queue_full",
                           "rate_limit_error", {"Retry-After": "1"}) from None

    @staticmethod
    def _send(job: Job, event) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _run(self) -> None:
        from . import mlx_thread

        try:
            while not self.stopping:
                mlx_thread.run(self._advance, self._take(block=not self.jobs))
            cluster = getattr(self.decoder, "cluster", None)  # a distributed.ReplicatedDecoder's
            if cluster is not None:
                cluster.close()
        except BaseException as e:  # the loop must never die silently: /health reports it
            self.alive = False
            for job in self.admitting + [job for job, _ in self.jobs.values()]:
                self._send(job, APIError(500, f"the generation loop stopped ({type(e).__name__})", kind="server_error"))
            while not self.pending.empty():
                self._send(self.pending.get_nowait(), APIError(503, "the generation loop stopped", kind="server_error"))
            if not lost_peer(e):
                raise
            # a rank of a split model is gone: nothing more can be generated, so the server ends
            self.failure = f"lost another rank of the distributed group, which stopped or crashed ({e})"
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    def _take(self, block: bool) -> List[Job]:
        """The queued jobs that fit in the batch; waits a little for one when nothing is running."""
        batch = []
        try:
            job = self.pending.get(timeout=0.5) if block else self.pending.get_nowait()
            while True:
                batch.append(job)
                if len(batch) + len(self.jobs) >= self.cfg.max_batch:
                    break
                job = self.pending.get_nowait()
        except queue.Empty:
            pass
        return batch

    def _advance(self, batch: List[Job]) -> None:
        """One step, on the MLX thread: admit ``batch``, drop cancelled jobs, decode and deliver a token each."""
        self._admit(batch)
        self._reap_cancelled()
        for t in self.decoder.step():
            self._deliver(t)

    def _admit(self, batch: List[Job]) -> None:
        from .engine import Sampling

        ready = []
        self.admitting = batch
        for job in batch:
            if job.cancelled:
                continue
            try:
                prompt = self.engine.prepare(job.request.messages)  # the default system message unless one is given
                ready.append((job, prompt, Sampling(**job.request.sampling)))
            except FastVLMError as e:
                code = "context_length_exceeded" if "context" in str(e) else None
                self._send(job, APIError(400, str(e), "messages", code))
        if ready:
            for (job, _, _), admitted in zip(ready, self.decoder.admit([(p, s) for _, p, s in ready])):
                state = dict(admitted=admitted, text="", sent=0, first=None, logprobs=[])
                self.jobs[admitted.uid] = (job, state)
        self.admitting = []

    def _reap_cancelled(self) -> None:
        for uid, (job, _) in list(self.jobs.items()):
            if job.cancelled or time.perf_counter() - job.created > self.cfg.request_timeout:
                self.decoder.cancel(uid)
                self.jobs.pop(uid)
                if not job.cancelled:
                    self._send(job, APIError(504, "the request timed out", None, "timeout", "server_error"))

    def _deliver(self, t) -> None:
        if t.uid not in self.jobs:
            return
        job, st = self.jobs[t.uid]
        request = job.request
        if t.error is not None:  # the sequence was dropped (its logits overflowed): this request fails alone
            self.jobs.pop(t.uid)
            self._send(job, APIError(500, t.error, None, "non_finite_logits", "server_error"))
            return
        if st["first"] is None:
            st["first"] = time.perf_counter()
            self.metrics.observe("ttft_seconds", st["first"] - job.created)
        finish = t.finish_reason
        if request.logprobs and not t.eos:
            st["logprobs"].append(self._logprob_entry(t, request.top_logprobs))
        st["text"] += t.text
        text = st["text"]
        # stop strings: cut at the first match; hold back a tail that could still become one
        cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        hold = 0 if finish else max((k for s in request.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        visible = text[: len(text) - hold]
        delta, st["sent"] = visible[st["sent"]:], len(visible)
        entries, st["logprobs"] = st["logprobs"], []
        if delta or entries:
            self._send(job, {"delta": delta, "logprobs": entries})
        if finish is not None:
            if t.finish_reason is None:
                self.decoder.cancel(t.uid)
            self.jobs.pop(t.uid)
            a = st["admitted"]
            self.metrics.add_tokens(a.prompt_tokens, a.cached_tokens, t.generation_tokens)
            self._send(job, {"finish_reason": "length" if finish == "length" else "stop",
                             "usage": dict(prompt_tokens=a.prompt_tokens, completion_tokens=t.generation_tokens,
                                           total_tokens=a.prompt_tokens + t.generation_tokens,
                                           prompt_tokens_details={"cached_tokens": a.cached_tokens})})

    def _logprob_entry(self, t, top: int) -> dict:
        import mlx.core as mx

        tok = self.engine.processor.tokenizer
        def entry(i, lp):
            s = tok.decode([i])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        out = entry(t.token, t.logprobs[t.token].item())
        if top:
            ids = mx.argsort(-t.logprobs)[:top].tolist()
            values = t.logprobs[mx.array(ids)].tolist()
            out["top_logprobs"] = [entry(i, v) for i, v in zip(ids, values)]
        else:
            out["top_logprobs"] = []
        return out


# ---------------------------------------------------------------------------------- the app
def create_app(model, processor, cfg: ServerConfig, model_id: str):
    """The FastAPI application, its generation loop started when the app starts."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .engine import engine_for

    engine = engine_for(model, processor, image_cache_bytes=cfg.image_cache_bytes)
    metrics = Metrics()
    loop_ = GenerationLoop(engine, cfg, metrics)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop_.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, loop_.stop)

    app = FastAPI(title="fastvlm-mlx", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.generation = loop_

    def error_response(e: APIError) -> JSONResponse:
        metrics.count(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(APIError(e.status_code, str(e.detail), kind="invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error_response(APIError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(APIError(500, f"internal error ({type(e).__name__})", kind="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                return error_response(APIError(401, "invalid or missing API key", None, "invalid_api_key",
                                               "authentication_error"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not loop_.alive:
            return JSONResponse({"status": "generation loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "fastvlm-mlx"}]}

    @app.get("/metrics")
    async def prometheus():
        cache = engine.image_cache
        gauges = dict(queue_depth=loop_.pending.qsize(), running_batch_size=len(loop_.jobs),
                      image_cache_hits_total=cache.hits, image_cache_misses_total=cache.misses,
                      image_cache_bytes=cache.nbytes, prompt_cache_bytes=loop_.decoder.cache_bytes,
                      **memory_gauges())
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large")
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not loop_.alive:
            raise APIError(503, "the generation loop stopped", kind="server_error")
        parsed = await asyncio.to_thread(parse_request, body, cfg)  # images are decoded off the event loop
        job = Job(parsed, asyncio.get_running_loop(), asyncio.Queue())
        loop_.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            return StreamingResponse(_sse(job, request, rid, created), media_type="text/event-stream")
        return await _complete(job, request, rid, created)

    async def _next_event(job: Job, request: Request, keepalive: Optional[float]):
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=keepalive or 1.0)
            except asyncio.TimeoutError:
                if not loop_.alive and job.events.empty():
                    return APIError(503, "the generation loop stopped", kind="server_error")
                if await request.is_disconnected():
                    job.cancelled = True
                    return None
                if keepalive:
                    return "keepalive"

    async def _complete(job: Job, request: Request, rid: str, created: int):
        text, entries = [], []
        while True:
            event = await _next_event(job, request, None)
            if event is None:
                raise APIError(499, "client closed the request")
            if isinstance(event, APIError):
                raise event
            text.append(event.get("delta", ""))
            entries += event.get("logprobs", [])
            if "finish_reason" in event:
                break
        metrics.count(200)
        metrics.observe("request_latency_seconds", time.perf_counter() - job.created)
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": event["finish_reason"], "logprobs": {"content": entries} if job.request.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [choice], "usage": event["usage"]}

    async def _sse(job: Job, request: Request, rid: str, created: int):
        def chunk(delta, finish=None, logprobs=None, usage=None, choices=True):
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}] if choices else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await _next_event(job, request, cfg.keepalive_s)
                if event is None:
                    return
                if event == "keepalive":
                    yield ": keepalive\n\n"
                    continue
                if isinstance(event, APIError):
                    metrics.count(event.status)
                    yield f"data: {json.dumps(event.body())}\n\n"
                    return
                if event.get("delta") or event.get("logprobs"):
                    lp = {"content": event["logprobs"]} if job.request.logprobs else None
                    yield chunk({"content": event["delta"]}, logprobs=lp)
                if "finish_reason" in event:
                    yield chunk({}, finish=event["finish_reason"])
                    if job.request.include_usage:
                        yield chunk(None, usage=event["usage"], choices=False)
                    yield "data: [DONE]\n\n"
                    metrics.count(200)
                    metrics.observe("request_latency_seconds", time.perf_counter() - job.created)
                    return
        finally:  # the client went away, or the stream ended: the sequence leaves the batch either way
            job.cancelled = True

    return app


def listen(host: str, port: int):
    """A socket bound and listening on host:port, made before the model loads, so that a busy port fails
    at once; uvicorn then serves on it."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise FastVLMError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    try:
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: not blocked by TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise FastVLMError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def main(argv: Optional[List[str]] = None) -> int:
    import typer

    from . import distributed
    from .cli import dtype_option, sampling_options, use_one_line_warnings
    from .engine import engine_for
    from .errors import exit_on_user_error
    from .loader import DEFAULT_MODEL, load

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Serve FastVLM over the OpenAI chat-completions API (binds to 127.0.0.1 by default). "
                      "The sampling options are the defaults of requests that leave them out.")
    @exit_on_user_error
    @sampling_options
    def run(
        model_path: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id."),
        dtype: Optional[str] = dtype_option(),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port, printed at start)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
        max_tokens_limit: int = typer.Option(4096, "--max-tokens-limit", help="Cap on max_tokens per request."),
        max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond the batch (429 when full)."),
        max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together."),
        request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds before a request is ended (504)."),
        max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="Largest request body accepted (413)."),
        max_image_mb: float = typer.Option(16.0, "--max-image-mb", help="Largest image file accepted."),
        max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels", help="Largest decoded image accepted."),
        allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs."),
        allowed_image_dir: Optional[str] = typer.Option(None, "--allowed-image-dir", help="Serve local image paths under DIR."),
        image_cache_mb: int = typer.Option(256, "--image-cache-mb", help="Image-feature cache bound (0 disables)."),
        prompt_cache_mb: int = typer.Option(1024, "--prompt-cache-mb", help="Prompt (KV) cache bound."),
        parallel: str = typer.Option("tensor", "--parallel", help=distributed.PARALLEL_HELP),
        connect_timeout: float = typer.Option(distributed.DEFAULT_CONNECT_TIMEOUT, "--connect-timeout",
                                              help=distributed.CONNECT_HELP),
        sampling: Optional[dict] = None,
    ):
        if allowed_image_dir is not None and not Path(allowed_image_dir).is_dir():
            raise FastVLMError(f"{allowed_image_dir}: --allowed-image-dir is not a directory")
        cfg = ServerConfig(model=model_path, host=host, port=port, api_key=api_key, max_tokens_limit=max_tokens_limit,
                           max_queue=max_queue, max_batch=max_batch, request_timeout=request_timeout,
                           max_body_bytes=int(max_body_mb * (1 << 20)),
                           max_image_bytes=int(max_image_mb * (1 << 20)), max_image_pixels=max_image_pixels,
                           allow_remote_images=allow_remote_images, allowed_image_dir=allowed_image_dir,
                           image_cache_bytes=image_cache_mb << 20, prompt_cache_bytes=prompt_cache_mb << 20,
                           sampling=sampling)
        try:
            import uvicorn
        except ImportError:
            raise FastVLMError("the server needs FastAPI and uvicorn: pip install -e '.[server]'") from None
        cluster = distributed.start(parallel, connect_timeout)
        sock = listen(host, port) if cluster is None or cluster.leader else None  # before the slow model load
        try:
            model, processor = load(model_path, dtype=dtype, cluster=cluster)
            if not distributed.follow_or_lead(cluster, engine_for(model, processor, cfg.image_cache_bytes)):
                return  # a follower rank: rank 0 serves
            service = create_app(model, processor, cfg, model_path)
            bound = sock.getsockname()
            url = f"http://{host}:{bound[1]}/v1"

            class Announcing(uvicorn.Server):
                async def startup(self, sockets=None):
                    await super().startup(sockets=sockets)
                    if self.started:  # the app is up and the socket accepts requests
                        print(f"fastvlm-mlx serving {model_path} on {url}", file=sys.stderr, flush=True)

            server = Announcing(uvicorn.Config(service, log_level="warning"))
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass
            finally:  # the generation loop ends between steps, and lets follower ranks go
                service.state.generation.stop()
        finally:
            if sock is not None:
                sock.close()
        if service.state.generation.failure:
            raise FastVLMError(service.state.generation.failure)

    app(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
