"""The OpenAI chat-completions wire format as pydantic models: the request (checked strictly, and turned into
engine messages and sampling parameters), the response, the stream chunk, usage, log-probabilities and errors.

Nothing here touches the network, the files or the model: images are loaded by the ``load_image`` callback
that ``engine_messages`` is given (``images.py`` supplies it).

Structured output (``fastvlm_mlx.structured`` compiles it; the scheduler's decoder masks the logits):

- ``response_format`` as OpenAI defines it: ``{"type": "text"}``, ``{"type": "json_object"}`` or
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``.  The JSON is compact.
- ``structured_outputs``, this server's extension (the field and shape of vLLM's newer API), exactly one of
  ``{"regex": "..."}`` (the whole answer matches it; Rust regex syntax), ``{"choice": ["yes", "no"]}``,
  ``{"grammar": "start: ..."}`` (a Lark grammar, llguidance's dialect) or ``{"json": {...schema...}}``.
  It cannot be combined with ``response_format``.  With the openai client: ``extra_body={"structured_outputs": ...}``.
- ``tools`` (type ``function``) with ``tool_choice`` ``"required"`` or ``{"type": "function", "function":
  {"name": ...}}``: the call's arguments are generated under the function's ``parameters`` schema (with several
  tools and ``"required"``, under a grammar that picks one of them) and returned as ``tool_calls`` with
  ``finish_reason`` ``"tool_calls"``; the tools are listed in the system message.  ``tool_choice`` ``"none"``
  answers in plain text.  ``"auto"`` (the default with tools) is refused: the model cannot decide by itself
  whether to call.  Tool results (role ``tool``) and assistant ``tool_calls`` in the history are refused.

A schema, regex or grammar that cannot be compiled is a 400 naming the field, before the request is queued.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Fields of the chat-completions request that are implemented; any other non-null field is refused.
SUPPORTED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "logprobs", "top_logprobs", "top_k", "min_p", "repetition_penalty", "n", "user",
    "response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls",
}  # fmt: skip
UNSUPPORTED = "unsupported_parameter"  # the error code of a refused field, as OpenAI names it


# ------------------------------------------------------------------------------------------ errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, offending parameter and code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    @classmethod
    def invalid(cls, e: ValidationError) -> "APIError":
        """A 400 naming where the first problem of a request is: ``messages[0].content[1]: ...``."""
        error = e.errors(include_url=False)[0]
        loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("<"))]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        message = error["ctx"]["error"] if error["type"] == "value_error" else error["msg"]
        code = error["type"] if error["type"] == UNSUPPORTED else None
        return cls(400, f"{where}: {message}" if where else str(message), str(loc[0]) if loc else None, code)


# ----------------------------------------------------------------------------------------- request
# Unions are told apart by a discriminator whose tags start with "<", so an error's location names fields only.
class Strict(BaseModel):
    """JSON types as sent: no "1" for 1, no true for 1 (an int is still a valid float)."""

    model_config = ConfigDict(strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    model_config = ConfigDict(extra="ignore")  # OpenAI's "detail" is accepted, and has no effect here
    url: str = Field(min_length=1)


def _bare_url(value):
    """A part's URL may be given bare, as a string: ``{"url": value}``."""
    return {"url": value} if isinstance(value, str) else value


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    _bare = field_validator("image_url", mode="before")(_bare_url)


class FrameSampling(Strict):
    """How many of a video's frames go into the prompt: ``frames`` evenly spread (8 by default) or ``fps`` a
    second; this server's extension, shared by both APIs' video parts."""

    frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_sampling(self):
        if self.frames is not None and self.fps is not None:
            raise ValueError("give frames or fps, not both")
        return self


class VideoURL(FrameSampling):
    """A video as a data URL or an allowed file (vLLM's part shape)."""

    url: str = Field(min_length=1)


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: VideoURL

    _bare = field_validator("video_url", mode="before")(_bare_url)


def _part_kind(part) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "<text>", "image_url": "<image_url>", "video_url": "<video_url>"}.get(kind)


Part = Annotated[
    Annotated[TextPart, Tag("<text>")] | Annotated[ImagePart, Tag("<image_url>")]
    | Annotated[VideoPart, Tag("<video_url>")],
    Discriminator(_part_kind, custom_error_type="part_type",
                  custom_error_message="unsupported part (a part's type is text, image_url or video_url)"),
]  # fmt: skip
Content = Annotated[
    Annotated[str, Tag("<string>")] | Annotated[list[Part], Tag("<parts>")],
    Discriminator(lambda v: "<string>" if isinstance(v, str) else "<parts>" if isinstance(v, list) else None,
                  custom_error_type="content_type", custom_error_message="content must be a string or a list of parts"),
]  # fmt: skip


class Closed(Strict):
    """An object whose unknown fields are refused by name, so a misspelt option is never silently ignored (null
    ones are let through, as OpenAI does)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _no_other_fields(self):
        extra = sorted(k for k, v in (self.model_extra or {}).items() if v is not None)
        if extra:
            raise PydanticCustomError(UNSUPPORTED, "unsupported field(s) {fields}", {"fields": ", ".join(extra)})
        return self


class Message(Closed):
    role: Literal["system", "user", "assistant", "developer"]
    content: Content
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_tool_turns(cls, value):
        """Tool results cannot go back to the model: its conversation template has no place for them."""
        if isinstance(value, dict) and (value.get("role") == "tool" or value.get("tool_calls") is not None):
            what = 'tool results (role "tool")' if value.get("role") == "tool" else "tool_calls"
            raise PydanticCustomError(
                UNSUPPORTED, "{what} in the conversation are not supported (tool calls are generated, "
                "not continued)", {"what": what},
            )  # fmt: skip
        return value


class StreamOptions(Strict):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# ------------------------------------------------------------------------------ structured output
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # a response format's or function's name, as OpenAI allows it


class TextFormat(Closed):
    type: Literal["text"]


class JSONObjectFormat(Closed):
    type: Literal["json_object"]


class JSONSchemaSpec(Closed):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class JSONSchemaFormat(Closed):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


def _format_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "<text>", "json_object": "<json_object>", "json_schema": "<json_schema>"}.get(kind)


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("<text>")] | Annotated[JSONObjectFormat, Tag("<json_object>")]
    | Annotated[JSONSchemaFormat, Tag("<json_schema>")],
    Discriminator(_format_kind, custom_error_type="format_type",
                  custom_error_message="the type is text, json_object or json_schema"),
]  # fmt: skip


class StructuredOutputs(Closed):
    """The extension field: exactly one of a regex, a list of choices, a Lark grammar or a JSON schema."""

    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_: dict | str | None = Field(None, alias="json")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("regex", "choice", "grammar", "json_") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of regex, choice, grammar, json")
        return self


class FunctionDefinition(Closed):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict | None = None  # absent: a function without arguments
    strict: bool | None = None  # the parameters' schema is always enforced


class Tool(Closed):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Closed):
    name: str


class NamedToolChoice(Closed):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("<mode>")] | Annotated[NamedToolChoice, Tag("<named>")],
    Discriminator(lambda v: "<mode>" if isinstance(v, str) else "<named>", custom_error_type="tool_choice_type",
                  custom_error_message='tool_choice is "none", "auto", "required" or a named function'),
]  # fmt: skip
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCallShape:
    """How a forced tool call is generated and read back: the arguments of ``function`` alone, or, when the
    model picks one of ``names`` (``function`` None), ``{"name":"...","arguments":{...}}`` in that order."""

    names: tuple[str, ...]
    function: str | None = None

    @staticmethod
    def prefix(name: str) -> str:
        return '{"name":' + json.dumps(name) + ',"arguments":'

    def read(self, text: str, final: bool) -> tuple[str | None, str]:
        """(the function's name, None until it is generated; the arguments' text so far).  Of a picked call, a
        last "}" is held back until the answer is ``final``: it may close the wrapper rather than the arguments."""
        if self.function is not None:
            return self.function, text
        for name in self.names:
            if text.startswith(self.prefix(name)):
                arguments = text[len(self.prefix(name)) :]
                if arguments.endswith("}") and (not final or self.is_complete(text)):
                    arguments = arguments[:-1]
                return name, arguments
        return None, ""

    @staticmethod
    def is_complete(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    def grammar(self, schemas: list[dict]) -> str:
        """A Lark grammar for one call of any of the tools, each one's arguments under its own schema."""
        rules = [" | ".join(f'{json.dumps(self.prefix(n))} args{i} "}}"' for i, n in enumerate(self.names))]
        for i, schema in enumerate(schemas):  # compact JSON, as every other structured answer
            schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}
            rules.append(f"args{i}: %json {json.dumps(schema)}")
        return "start: " + "\n".join(rules) + "\n"


def tools_system_text(tools: list[Tool]) -> str:
    """The tools as the system message lists them, so that the model knows what it calls: names and descriptions
    only (the parameters' schema is enforced while the arguments are generated, and would fill a small context)."""
    lines = "".join(f"\n- {t.function.name}" + (f": {t.function.description}" if t.function.description else "")
                    for t in tools)  # fmt: skip
    return f"\n\n# Tools\n\nYou answer by calling one of these functions, with its arguments as JSON:{lines}"


def engine_turns(messages, field: str, convert: Callable[[Any, str], tuple[list[dict], dict | None]]) -> list[dict]:
    """Messages of either API as the engine takes them: "developer" is the system role, and each content part
    becomes engine parts by ``convert(part, where)`` (``where`` names it as ``field[i].content[j]``), which also
    gives a video's text of its frames' times: that goes before the message's own text, after its images."""
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            out.append({"role": role, "content": message.content})
            continue
        parts, times = [], []
        for j, part in enumerate(message.content):
            converted, timing = convert(part, f"{field}[{i}].content[{j}]")
            parts += converted
            times += [timing] if timing is not None else []
        first_text = next((k for k, p in enumerate(parts) if p["type"] == "text"), len(parts))
        out.append({"role": role, "content": parts[:first_text] + times + parts[first_text:]})
    return out


class ChatCompletionRequest(Strict):
    """A chat-completions request, checked field by field; fields outside ``SUPPORTED`` are refused."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are refused before validation (``parse``)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0)
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # one call is generated, which either value allows

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value not in (None, 1):
            raise PydanticCustomError(UNSUPPORTED, "n > 1 is not supported")
        return value

    @classmethod
    def parse(cls, body: Any) -> "ChatCompletionRequest":
        """A decoded JSON body -> the request, or an ``APIError`` (400) naming the first problem."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        unknown = sorted(k for k, v in body.items() if k not in SUPPORTED and v is not None)
        if unknown:
            raise APIError(400, f"unsupported field(s): {', '.join(unknown)}", unknown[0], UNSUPPORTED)
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise APIError.invalid(e) from None

    def output(self) -> tuple[Any, ToolCallShape | None]:
        """What the answer must match, compiled (``structured.Constraint``, None for free text), and for a forced
        tool call how to read it back; an ``APIError`` (400) names the field that cannot be used."""
        from ..structured import StructuredOutputError, constrain, from_lark, from_schema

        def compiled(param: str, make, *args, **kwargs):
            try:
                return make(*args, **kwargs)
            except StructuredOutputError as e:
                message = str(e) if str(e).startswith(param) else f"{param}: {e}"
                raise APIError(400, message, param, "invalid_" + param.split("[")[0].split(".")[0]) from None

        fmt = self.response_format if not isinstance(self.response_format, TextFormat) else None
        if fmt is not None and self.structured_outputs is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", "structured_outputs")
        if self.tool_choice is not None and not self.tools:
            raise APIError(400, "tool_choice is only allowed when tools are given", "tool_choice")
        choice = self.tool_choice or "auto"
        if self.tools and choice == "auto":
            raise APIError(
                400, 'tool_choice "auto" (the default with tools) is not supported: the model cannot decide by '
                'itself whether to call a tool; set tool_choice to "required", to {"type": "function", "function": '
                '{"name": ...}}, or to "none"', "tool_choice", UNSUPPORTED,
            )  # fmt: skip
        if not self.tools or choice == "none":
            if isinstance(fmt, JSONSchemaFormat):
                return compiled("response_format", from_schema, fmt.json_schema.schema_), None
            if isinstance(fmt, JSONObjectFormat):
                return compiled("response_format", from_schema, {"type": "object"}, kind="json_object"), None
            so = self.structured_outputs
            if so is None:
                return None, None
            given = dict(regex=so.regex, choices=so.choice, grammar=so.grammar, schema=so.json_)
            return compiled("structured_outputs", constrain, **{k: v for k, v in given.items() if v is not None}), None
        if fmt is not None or self.structured_outputs is not None:
            field = "response_format" if fmt is not None else "structured_outputs"
            raise APIError(400, f"{field} cannot be combined with a forced tool call: the answer is the call", field)
        if self.logprobs:
            raise APIError(400, "logprobs are not returned for tool calls", "logprobs", UNSUPPORTED)
        names = tuple(t.function.name for t in self.tools)
        if len(set(names)) < len(names):
            raise APIError(400, "tools: each function needs a name of its own", "tools")
        schemas = []
        for i, tool in enumerate(self.tools):
            schema = NO_ARGUMENTS if tool.function.parameters is None else tool.function.parameters
            where = f"tools[{i}].function.parameters"
            if schema.get("type", "object") != "object":
                raise APIError(400, f"{where}: the arguments must be a JSON object (type object)", where)
            schemas.append((compiled(where, from_schema, schema), schema))
        if choice == "required" and len(names) > 1:
            shape = ToolCallShape(names)
            return compiled("tools", from_lark, shape.grammar([schema for _, schema in schemas])), shape
        name = names[0] if choice == "required" else choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice: the function {name!r} is not one of the tools", "tool_choice")
        return schemas[names.index(name)][0], ToolCallShape(names, name)

    def sampling_params(self, defaults: dict, max_tokens_limit: int) -> dict:
        """``engine.Sampling``'s fields: what the request gives, ``defaults`` for the rest, ``max_tokens`` capped."""
        given = dict(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )
        params = {name: defaults[name] if value is None else value for name, value in given.items()}
        params["max_tokens"] = min(params["max_tokens"], max_tokens_limit)
        return params

    def engine_messages(
        self, load_image: Callable[[str, str], Any], load_video: Callable[[VideoURL, str], list[dict]] | None = None
    ) -> list[dict]:
        """The conversation as the engine takes it; ``load_image(url, where)`` turns an image_url into an image,
        ``load_video(video_url, where)`` a video_url into its frames' image parts and a text part of their times."""

        def convert(part, where: str):
            if isinstance(part, TextPart):
                return [{"type": "text", "text": part.text}], None
            if isinstance(part, VideoPart):
                if load_video is None:
                    raise APIError(400, f"{where}: video_url parts are not supported here", "messages")
                *frames, timing = load_video(part.video_url, where)
                return frames, timing
            return [{"type": "image", "image": load_image(part.image_url.url, where)}], None

        return engine_turns(self.messages, "messages", convert)

    def with_tools_listed(self, messages: list[dict], default_system: str) -> list[dict]:
        """``messages`` with the tools added to the system message (made from ``default_system`` if there is
        none), where a tool call is forced."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return messages
        text = tools_system_text(self.tools)
        first = messages[0]
        if first["role"] != "system":
            return [{"role": "system", "content": default_system + text}, *messages]
        if isinstance(first["content"], str):
            return [{"role": "system", "content": first["content"] + text}, *messages[1:]]
        return [{"role": "system", "content": [*first["content"], {"type": "text", "text": text}]}, *messages[1:]]


# ---------------------------------------------------------------------------------------- response
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class Timings(BaseModel):
    """Where an answer's time went, as llama.cpp's server reports it beside the OpenAI fields (an extension that
    clients ignore): ``ttft_ms`` from the request's receipt to the first token (image decoding, queueing, the
    image encode and the prefill), ``vision_ms`` the image encode (0 when every image came from the cache),
    ``prompt_ms`` the prefill, ``tokens_per_second`` the decode rate after the first token, ``cached_tokens``
    the prompt tokens taken from the prompt cache."""

    ttft_ms: float
    vision_ms: float
    prompt_ms: float
    tokens_per_second: float
    cached_tokens: int


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_only_when_made(self, handler):
        data = handler(self)
        if self.tool_calls is None:
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    timings: Timings | None = None  # this server's extension, as llama.cpp's


class OnlyWhatIsSet(BaseModel):
    """A part of a chunk: fields not set are left out."""

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(OnlyWhatIsSet):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OnlyWhatIsSet):
    """A tool call's part in a chunk: the first gives id, type and name; the next ones more of the arguments."""

    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    """What a chunk adds to the answer; fields not set are left out of the chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the last chunk, when stream_options.include_usage asks for it
    timings: Timings | None = None  # with the usage (this server's extension, as llama.cpp's)

    @model_serializer(mode="wrap")
    def _usage_only_when_given(self, handler):
        data = handler(self)
        for name in ("usage", "timings"):
            if data.get(name) is None:
                data.pop(name, None)
        return data
