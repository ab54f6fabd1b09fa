"""The OpenAI chat-completions wire format as pydantic models: the request (checked strictly, and turned into
engine messages and sampling parameters), the response, the stream chunk, usage, log-probabilities and errors.

Nothing here touches the network, the files or the model: images are loaded by the ``load_image`` callback
that ``engine_messages`` is given (``images.py`` supplies it).
"""

from collections.abc import Callable
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


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value):
        return {"url": value} if isinstance(value, str) else value


def _part_kind(part) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "<text>", "image_url": "<image_url>"}.get(kind)


Part = Annotated[
    Annotated[TextPart, Tag("<text>")] | Annotated[ImagePart, Tag("<image_url>")],
    Discriminator(_part_kind, custom_error_type="part_type",
                  custom_error_message="unsupported part (a part's type is text or image_url)"),
]  # fmt: skip
Content = Annotated[
    Annotated[str, Tag("<string>")] | Annotated[list[Part], Tag("<parts>")],
    Discriminator(lambda v: "<string>" if isinstance(v, str) else "<parts>" if isinstance(v, list) else None,
                  custom_error_type="content_type", custom_error_message="content must be a string or a list of parts"),
]  # fmt: skip


class Message(Strict):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: Content
    name: str | None = None

    @model_validator(mode="after")
    def _no_other_fields(self):
        extra = sorted(k for k, v in (self.model_extra or {}).items() if v is not None)
        if extra:
            raise PydanticCustomError(UNSUPPORTED, "unsupported field(s) {fields}", {"fields": ", ".join(extra)})
        return self


class StreamOptions(Strict):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


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

    def engine_messages(self, load_image: Callable[[str, str], Any]) -> list[dict]:
        """The conversation as the engine takes it; ``load_image(url, where)`` turns an image_url into an image."""
        out = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                out.append({"role": role, "content": message.content})
                continue
            parts = []
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                else:
                    parts.append(
                        {"type": "image", "image": load_image(part.image_url.url, f"messages[{i}].content[{j}]")}
                    )
            out.append({"role": role, "content": parts})
        return out


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


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class DeltaMessage(BaseModel):
    """What a chunk adds to the answer; fields not set are left out of the chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None

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

    @model_serializer(mode="wrap")
    def _usage_only_when_given(self, handler):
        data = handler(self)
        if self.usage is None:
            data.pop("usage", None)
        return data
