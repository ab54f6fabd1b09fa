"""OpenAI's Responses API (``POST /v1/responses``), stateless: nothing is stored, so every request carries the
whole conversation.  A request is checked here and translated into the same ``ParsedRequest`` that chat
completions submit to the scheduler; its events come back as one response object or as Responses stream events.

The wire format (pydantic models) comes first, then the serving.
"""

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .config import ServerConfig
from .protocol import UNSUPPORTED, APIError, Closed, FrameSampling, Strict, Timings, Usage, engine_turns
from .scheduler import Delta, Failed, Finished, Job, ParsedRequest
from .serving import KEEPALIVE, ChatService, Disconnected

# Fields of a Responses request that are implemented; any other non-empty field is refused.  ``store`` is
# accepted (the client leaves it out and OpenAI defaults it to true) but nothing is ever stored.
SUPPORTED = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "seed", "text", "stream", "store", "metadata", "user",
}  # fmt: skip
STATELESS = {"previous_response_id", "conversation"}  # refused with a message saying why


# ---------------------------------------------------------------------------------------- request
class InputText(Closed):
    type: Literal["input_text"]
    text: str


class OutputTextIn(Closed):
    """An earlier answer given back as input (an output message's part)."""

    type: Literal["output_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


class InputImage(Closed):
    type: Literal["input_image"]
    image_url: str | None = Field(None, min_length=1)
    detail: Literal["low", "high", "auto", "original"] | None = None  # accepted; it has no effect here

    @model_validator(mode="after")
    def _has_url(self):
        if self.image_url is None:
            raise ValueError("input_image needs image_url (a data URL, an http(s) URL or an allowed file)")
        return self


class InputVideo(Closed, FrameSampling):
    """This server's extension: a video (a data URL or an allowed file) whose frames go into the prompt with their
    times."""

    type: Literal["input_video"]
    video_url: str = Field(min_length=1)


def unknown_type(what: str, kinds: tuple[str, ...]):
    """A union member that refuses a ``type`` outside ``kinds``, naming it."""

    class Unknown(Strict):
        @model_validator(mode="before")
        @classmethod
        def _refuse(cls, value):
            raise PydanticCustomError(
                UNSUPPORTED, "unsupported {what} type {kind} (expected {kinds})",
                {"what": what, "kind": repr(value.get("type")), "kinds": ", ".join(kinds)},
            )  # fmt: skip

    return Annotated[Unknown, Tag("<unknown>")]


def by_type(kinds: tuple[str, ...], what: str):
    """A discriminator on ``type``: an object of another type is refused by ``unknown_type``."""

    def tag(value):
        if not isinstance(value, dict) or value.get("type") is None:
            return None
        return f"<{value['type']}>" if value["type"] in kinds else "<unknown>"

    return Discriminator(
        tag,
        custom_error_type=f"{what}_type",
        custom_error_message=f"a {what} must be an object with a type ({', '.join(kinds)})",
    )


PART_TYPES = ("input_text", "input_image", "input_video", "output_text")
InputPart = Annotated[
    Annotated[InputText, Tag("<input_text>")]
    | Annotated[InputImage, Tag("<input_image>")]
    | Annotated[InputVideo, Tag("<input_video>")]
    | Annotated[OutputTextIn, Tag("<output_text>")]
    | unknown_type("part", PART_TYPES),
    by_type(PART_TYPES, "part"),
]
Content = Annotated[
    Annotated[str, Tag("<string>")] | Annotated[list[InputPart], Tag("<parts>")],
    Discriminator(
        lambda v: "<string>" if isinstance(v, str) else "<parts>" if isinstance(v, list) else None,
        custom_error_type="content_type",
        custom_error_message="content must be a string or a list of parts",
    ),
]


class InputMessage(Closed):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None  # an output message given back keeps its id and status; neither matters here
    status: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, value):
        if isinstance(value, dict) and value.get("type", "message") != "message":
            raise PydanticCustomError(
                UNSUPPORTED, "unsupported input item type {kind} (only messages)", {"kind": repr(value["type"])}
            )
        return value


Input = Annotated[
    Annotated[str, Tag("<string>")] | Annotated[list[InputMessage], Tag("<messages>")],
    Discriminator(
        lambda v: "<string>" if isinstance(v, str) else "<messages>" if isinstance(v, list) else None,
        custom_error_type="input_type",
        custom_error_message="input must be a string or a list of messages",
    ),
]


class TextFormatText(Closed):
    type: Literal["text"]


class TextFormatJSONObject(Closed):
    type: Literal["json_object"]


class TextFormatJSONSchema(Closed):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


FORMAT_TYPES = ("text", "json_object", "json_schema")
TextFormat = Annotated[
    Annotated[TextFormatText, Tag("<text>")]
    | Annotated[TextFormatJSONObject, Tag("<json_object>")]
    | Annotated[TextFormatJSONSchema, Tag("<json_schema>")]
    | unknown_type("format", FORMAT_TYPES),
    by_type(FORMAT_TYPES, "format"),
]


class TextConfig(Closed):
    format: TextFormat | None = None


class ResponsesRequest(Strict):
    """A Responses request, checked field by field; fields outside ``SUPPORTED`` are refused."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are refused before validation (``parse``)
    model: str | None = None
    input: Input
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0)
    seed: int | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None

    @classmethod
    def parse(cls, body: Any) -> "ResponsesRequest":
        """A decoded JSON body -> the request, or an ``APIError`` (400) naming the first problem."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        for name in sorted(STATELESS):
            if body.get(name) is not None:
                raise APIError(
                    400, f"{name} is not supported: this server stores nothing; send the whole conversation in input",
                    name, UNSUPPORTED,
                )  # fmt: skip
        unknown = sorted(k for k, v in body.items() if k not in SUPPORTED and v not in (None, [], {}))
        if unknown:
            raise APIError(400, f"unsupported field(s): {', '.join(unknown)}", unknown[0], UNSUPPORTED)
        if isinstance(body.get("input"), list) and not body["input"]:
            raise APIError(400, "input: give a string or at least one message", "input")
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise APIError.invalid(e) from None

    @property
    def format(self) -> TextFormatText | TextFormatJSONObject | TextFormatJSONSchema:
        return (self.text and self.text.format) or TextFormatText(type="text")

    def sampling_params(self, defaults: dict, max_tokens_limit: int) -> dict:
        """``engine.Sampling``'s fields: what the request gives, ``defaults`` for the rest, tokens capped."""
        given = dict(
            max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
        )  # fmt: skip
        params = {name: defaults[name] if value is None else value for name, value in given.items()}
        params["max_tokens"] = min(params["max_tokens"], max_tokens_limit)
        return params

    def constraint(self) -> str | None:
        """The llguidance grammar ``text.format`` asks for (None for free text); a 400 names what cannot be used."""
        from ..structured import StructuredOutputError, from_schema

        fmt = self.format
        try:
            if fmt.type == "json_object":
                return from_schema({"type": "object"}, kind="json_object").grammar
            if fmt.type == "json_schema":
                return from_schema(fmt.schema_).grammar
        except StructuredOutputError as e:
            raise APIError(400, f"text.format: {e}", "text.format.schema", "invalid_json_schema") from None
        return None

    def engine_messages(self, load_image, load_video=None) -> list[dict]:
        """``instructions`` as a system message, then the input; ``load_image(url, where)`` decodes an image,
        ``load_video(part, where)`` a video into its frames' image parts and a text part of their times."""

        def convert(part, where: str):
            if isinstance(part, InputImage):
                return [{"type": "image", "image": load_image(part.image_url, where)}], None
            if isinstance(part, InputVideo):
                if load_video is None:
                    raise APIError(400, f"{where}: input_video is not supported here", "input")
                *frames, timing = load_video(part, where)
                return frames, timing
            return [{"type": "text", "text": part.text}], None

        out = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        return out + engine_turns(self.input, "input", convert)


# --------------------------------------------------------------------------------------- response
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> "ResponseUsage":
        return cls(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
            output_tokens=usage.completion_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=usage.total_tokens,
        )


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The response, with the request's settings echoed as OpenAI does; ``store`` is always false."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage] = []
    usage: ResponseUsage | None = None
    timings: Timings | None = None  # once generated: this server's extension, as in chat completions
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    text: dict
    tools: list = []
    tool_choice: Literal["none"] = "none"  # no tools are served
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    reasoning: None = None
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    store: bool = False
    metadata: dict[str, str] = {}
    user: str | None = None


# ---------------------------------------------------------------------------------------- serving
def parse_request(
    body, cfg: ServerConfig, model_id: str, max_frames: int | None = None
) -> tuple[ParsedRequest, ResponseObject]:
    """Check a Responses body: the scheduler's request (images and videos decoded, grammar compiled) and the
    response object it will fill in (status ``in_progress``, no output yet)."""
    from ..cli import sampling_defaults
    from .images import load_image_url, load_video_url

    def load_image(url: str, where: str):
        try:
            return load_image_url(url, where, cfg)
        except APIError as e:
            raise about_input(e) from None

    def load_video(part: InputVideo, where: str):
        try:
            return load_video_url(part.video_url, where, cfg, part.frames, part.fps, max_frames)
        except APIError as e:
            raise about_input(e) from None

    request = ResponsesRequest.parse(body)
    sampling = request.sampling_params({**sampling_defaults(), **cfg.sampling}, cfg.max_tokens_limit)
    sampling["constraint"] = request.constraint()
    messages = request.engine_messages(load_image, load_video)
    shell = ResponseObject(
        id=f"resp_{uuid.uuid4().hex}", created_at=int(time.time()), status="in_progress", model=model_id,
        instructions=request.instructions, max_output_tokens=request.max_output_tokens,
        temperature=sampling["temperature"], top_p=sampling["top_p"],
        text={"format": request.format.model_dump(by_alias=True, exclude_none=True)}, metadata=request.metadata or {},
        user=request.user,
    )  # fmt: skip
    return ParsedRequest(messages=messages, sampling=sampling, stream=bool(request.stream)), shell


def about_input(error: APIError) -> APIError:
    """The scheduler names a prompt's problems as chat's ``messages``; here they are the ``input``'s."""
    if error.param == "messages":
        error.param = "input"
    return error


def finished(shell: ResponseObject, message_id: str, text: str, event: Finished) -> ResponseObject:
    """The response once generation ended: ``incomplete`` when max_output_tokens cut it."""
    cut = event.reason == "length"
    message = OutputMessage(id=message_id, status="incomplete" if cut else "completed", content=[OutputText(text=text)])
    return shell.model_copy(
        update=dict(
            status="incomplete" if cut else "completed",
            output=[message],
            usage=ResponseUsage.of(event.usage),
            timings=event.timings,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if cut else None,
        )
    )


async def create(
    service: ChatService, body, disconnected: Disconnected, received: float | None = None
) -> ResponseObject | AsyncIterator[str]:
    """A response object, or for ``stream`` an iterator of server-sent events; ``APIError`` for a bad request.
    ``received`` (``time.perf_counter()``) is when the request came in: its TTFT counts from there."""
    received = time.perf_counter() if received is None else received
    if not service.alive:
        raise APIError(503, "the generation loop stopped", kind="server_error")
    parsed, shell = await asyncio.to_thread(  # images off the loop
        parse_request, body, service.cfg, service.model_id, service.max_frames
    )
    job = Job(parsed, asyncio.get_running_loop(), asyncio.Queue(), created=received)
    service.scheduler.submit(job)
    if parsed.stream:
        return _stream(service, job, disconnected, shell)
    return await _complete(service, job, disconnected, shell)


async def _complete(service: ChatService, job: Job, disconnected: Disconnected, shell: ResponseObject):
    text = []
    while True:
        event = await service._next_event(job, disconnected, None)
        if event is None:
            raise APIError(499, "client closed the request")
        if isinstance(event, Failed):
            raise about_input(event.error)
        if isinstance(event, Delta):
            text.append(event.text)
        if isinstance(event, Finished):
            break
    service._done(job)
    return finished(shell, f"msg_{uuid.uuid4().hex}", "".join(text), event)


async def _stream(service: ChatService, job: Job, disconnected: Disconnected, shell: ResponseObject):
    """The Responses stream: created, in_progress, the message and its text part opened, text deltas, then
    everything closed and ``response.completed`` (``response.incomplete`` when max_output_tokens cut it)."""
    numbers = itertools.count()
    message_id = f"msg_{uuid.uuid4().hex}"
    where = dict(item_id=message_id, output_index=0, content_index=0)

    def sse(kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": next(numbers), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    try:
        yield sse("response.created", response=shell.model_dump())
        yield sse("response.in_progress", response=shell.model_dump())
        text, opened = [], False
        while True:
            event = await service._next_event(job, disconnected, service.cfg.keepalive_s)
            if event is None:
                return
            if event is KEEPALIVE:
                yield ": keepalive\n\n"
                continue
            if isinstance(event, Failed):
                error = about_input(event.error)
                service.metrics.count(error.status)
                code = error.code or error.kind
                yield sse("error", code=code, message=error.message, param=error.param)
                failed = shell.model_copy(
                    update=dict(status="failed", error=ResponseError(code=code, message=error.message))
                )
                yield sse("response.failed", response=failed.model_dump())
                return
            if not opened:
                opened = True
                item = OutputMessage(id=message_id, status="in_progress", content=[])
                yield sse("response.output_item.added", output_index=0, item=item.model_dump())
                yield sse("response.content_part.added", **where, part=OutputText(text="").model_dump())
            if isinstance(event, Delta):
                if event.text:
                    text.append(event.text)
                    yield sse("response.output_text.delta", **where, delta=event.text, logprobs=[])
                continue
            done = finished(shell, message_id, "".join(text), event)
            message = done.output[0]
            yield sse("response.output_text.done", **where, text=message.content[0].text, logprobs=[])
            yield sse("response.content_part.done", **where, part=message.content[0].model_dump())
            yield sse("response.output_item.done", output_index=0, item=message.model_dump())
            kind = "response.completed" if done.status == "completed" else "response.incomplete"
            yield sse(kind, response=done.model_dump())
            service._done(job)
            return
    finally:  # the client went away, or the stream ended: the sequence leaves the batch either way
        job.cancelled = True
