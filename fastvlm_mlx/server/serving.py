"""Serving chat completions: a checked request goes to the scheduler, and its events come back as one
response or as server-sent chunks. Nothing here knows HTTP's framework; ``routes.py`` does."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from .config import ServerConfig
from .metrics import Metrics, memory_gauges
from .protocol import (
    APIError,
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    ToolCallShape,
)  # fmt: skip
from .scheduler import Delta, Failed, Finished, Job, ParsedRequest, Scheduler

KEEPALIVE = object()  # no event within the keep-alive interval: a streaming response sends a comment line
Disconnected = Callable[[], Awaitable[bool]]


def parse_request(body, cfg: ServerConfig, max_frames: int | None = None) -> ParsedRequest:
    """Check a chat-completions body and turn it into engine messages (images and videos decoded) and sampling
    options; a video may give at most ``max_frames`` frames (what the model's context could hold)."""
    from ..cli import sampling_defaults
    from ..processor import DEFAULT_SYSTEM
    from .images import load_image_url, load_video_url

    request = ChatCompletionRequest.parse(body)
    constraint, tool_call = request.output()  # compiled before any image is decoded: a bad schema costs little
    messages = request.engine_messages(
        lambda url, where: load_image_url(url, where, cfg),
        lambda part, where: load_video_url(part.url, where, cfg, part.frames, part.fps, max_frames),
    )
    messages = request.with_tools_listed(messages, DEFAULT_SYSTEM)
    sampling = request.sampling_params({**sampling_defaults(), **cfg.sampling}, cfg.max_tokens_limit)
    sampling["constraint"] = constraint.grammar if constraint is not None else None  # the decoder masks the logits
    options = request.stream_options
    return ParsedRequest(
        messages, sampling, bool(request.stream), bool(options and options.include_usage), bool(request.logprobs),
        request.top_logprobs or 0, request.stop or [], tool_call,
    )  # fmt: skip


class ToolCallStream:
    """A forced tool call's text, as it is generated, turned into what OpenAI sends: a call with its id, type and
    name (as soon as the name is known), then the arguments' text piece by piece."""

    def __init__(self, shape: ToolCallShape):
        self.shape, self.id = shape, f"call_{uuid.uuid4().hex[:24]}"
        self.text, self.name, self.sent = "", None, 0

    def feed(self, text: str, final: bool = False) -> list[DeltaMessage]:
        self.text += text
        name, arguments = self.shape.read(self.text, final)
        if name is None:
            return []
        deltas = []
        if self.name is None:
            self.name = name
            call = DeltaToolCall(id=self.id, type="function", function=DeltaFunctionCall(name=name, arguments=""))
            deltas.append(DeltaMessage(tool_calls=[call]))
        if len(arguments) > self.sent:
            piece, self.sent = arguments[self.sent :], len(arguments)
            deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(function=DeltaFunctionCall(arguments=piece))]))
        return deltas

    def finish_reason(self, reason: str) -> str:
        """The finish: "tool_calls" for a call generated to its end; "length" (or "stop", by a stop string) if cut."""
        return "tool_calls" if reason == "stop" and self.shape.is_complete(self.text) else reason

    def answer(self, text: str, reason: str) -> tuple[AssistantMessage, str]:
        """A whole answer as a message with its call (none if it was cut before the name), and its finish."""
        self.text = text
        name, arguments = self.shape.read(text, final=True)
        calls = None if name is None else [ToolCall(id=self.id, function=FunctionCall(name=name, arguments=arguments))]
        return AssistantMessage(content=None, tool_calls=calls), self.finish_reason(reason)


class ChatService:
    """The engine, its scheduler and the metrics of one served model."""

    def __init__(self, model, processor, cfg: ServerConfig, model_id: str):
        from ..engine import engine_for

        self.cfg, self.model_id = cfg, model_id
        self.engine = engine_for(model, processor, image_cache_bytes=cfg.image_cache_bytes)
        # the most video frames a request could fit: a video asking for more is refused before it is decoded
        self.max_frames = processor.context_length // model.config.num_image_tokens
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.engine, cfg, self.metrics)

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def render_metrics(self) -> str:
        return self.metrics.render({**self.scheduler.gauges(), **memory_gauges()})

    async def create(
        self, body, disconnected: Disconnected, received: float | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A response, or for ``stream`` an iterator of server-sent-event lines; ``APIError`` for a bad request.
        ``received`` (``time.perf_counter()``) is when the request came in: its TTFT counts from there."""
        received = time.perf_counter() if received is None else received
        if not self.alive:
            raise APIError(503, "the generation loop stopped", kind="server_error")
        parsed = await asyncio.to_thread(parse_request, body, self.cfg, self.max_frames)  # images: off the loop
        job = Job(parsed, asyncio.get_running_loop(), asyncio.Queue(), created=received)
        self.scheduler.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            return self._stream(job, disconnected, rid, created)
        return await self._complete(job, disconnected, rid, created)

    def _done(self, job: Job) -> None:
        self.metrics.count(200)
        self.metrics.observe("request_latency_seconds", time.perf_counter() - job.created)

    async def _next_event(self, job: Job, disconnected: Disconnected, keepalive: float | None):
        """The job's next event; None when the client went away; ``KEEPALIVE`` after ``keepalive`` s of nothing."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=keepalive or 1.0)
            except asyncio.TimeoutError:
                if not self.alive and job.events.empty():
                    return Failed(APIError(503, "the generation loop stopped", kind="server_error"))
                if await disconnected():
                    job.cancelled = True
                    return None
                if keepalive:
                    return KEEPALIVE

    async def _complete(self, job: Job, disconnected: Disconnected, rid: str, created: int) -> ChatCompletionResponse:
        text, entries = [], []
        while True:
            event = await self._next_event(job, disconnected, None)
            if event is None:
                raise APIError(499, "client closed the request")
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Delta):
                text.append(event.text)
                entries += event.logprobs
            if isinstance(event, Finished):
                break
        self._done(job)
        message, reason = AssistantMessage(content="".join(text)), event.reason
        if job.request.tool_call is not None:
            message, reason = ToolCallStream(job.request.tool_call).answer(message.content, reason)
        choice = Choice(
            message=message,
            finish_reason=reason,
            logprobs=ChoiceLogprobs(content=entries) if job.request.logprobs else None,
        )
        return ChatCompletionResponse(
            id=rid, created=created, model=self.model_id, choices=[choice], usage=event.usage, timings=event.timings
        )

    async def _stream(self, job: Job, disconnected: Disconnected, rid: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: DeltaMessage | None = None, finish=None, logprobs=None, usage=None, timings=None) -> str:
            choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]
            body = ChatCompletionChunk(
                id=rid, created=created, model=self.model_id, choices=choices, usage=usage, timings=timings
            )
            return f"data: {body.model_dump_json()}\n\n"

        tool = ToolCallStream(job.request.tool_call) if job.request.tool_call is not None else None
        try:
            yield chunk(DeltaMessage(role="assistant", content="" if tool is None else None))
            while True:
                event = await self._next_event(job, disconnected, self.cfg.keepalive_s)
                if event is None:
                    return
                if event is KEEPALIVE:
                    yield ": keepalive\n\n"
                elif isinstance(event, Failed):
                    self.metrics.count(event.error.status)
                    yield f"data: {json.dumps(event.error.body())}\n\n"
                    return
                elif isinstance(event, Delta) and tool is not None:
                    for delta in tool.feed(event.text):
                        yield chunk(delta)
                elif isinstance(event, Delta):
                    logprobs = ChoiceLogprobs(content=event.logprobs) if job.request.logprobs else None
                    yield chunk(DeltaMessage(content=event.text), logprobs=logprobs)
                else:
                    reason = event.reason
                    if tool is not None:
                        for delta in tool.feed("", final=True):
                            yield chunk(delta)
                        reason = tool.finish_reason(reason)
                    yield chunk(DeltaMessage(), finish=reason)
                    if job.request.include_usage:
                        yield chunk(usage=event.usage, timings=event.timings)
                    yield "data: [DONE]\n\n"
                    self._done(job)
                    return
        finally:  # the client went away, or the stream ended: the sequence leaves the batch either way
            job.cancelled = True
