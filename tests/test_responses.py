"""The Responses API (POST /v1/responses) on a real server over the fixture model, driven by the `openai` client's
``responses.create``/``parse``/``stream`` (and raw httpx for malformed requests).  Structured answers are checked
by the `jsonschema` package; the text by the chat-completions endpoint, which shares the generation path."""

import enum
import json
from typing import Literal

import pytest
from conftest import FIXTURES, PHOTO, PHOTO2
from test_server import KEY, Server, assert_error, data_url, httpx, openai

jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests need jsonschema")
from pydantic import BaseModel, Field  # noqa: E402

MAX_TOKENS_LIMIT = 96


@pytest.fixture(scope="module")
def server():
    s = Server(
        "--api-key", KEY, "--allowed-image-dir", str(FIXTURES / "images"), "--max-tokens-limit",
        str(MAX_TOKENS_LIMIT), "--image-cache-mb", "8", "--prompt-cache-mb", "32",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def image_input(text, *paths):
    """A Responses user message: an input_text part and the images as data URLs."""
    parts = [{"type": "input_text", "text": text}]
    return [{"role": "user", "content": parts + [{"type": "input_image", "image_url": data_url(p)} for p in paths]}]


def as_chat(messages, instructions=None):
    """The same conversation for the chat-completions endpoint."""
    out = [{"role": "system", "content": instructions}] if instructions else []
    for m in messages:
        parts = [
            {"type": "text", "text": p["text"]}
            if p["type"] == "input_text"
            else {"type": "image_url", "image_url": {"url": p["image_url"]}}
            for p in m["content"]
        ]
        out.append({"role": m["role"], "content": parts})
    return out


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Label(BaseModel):
    """Every string bounded: a random-weight model rarely closes an unbounded one."""

    kind: Literal["ball", "cup", "tree"]
    colour: Colour
    count: int = Field(ge=0, le=9)
    note: str = Field(max_length=6)


LABEL_SCHEMA = {**Label.model_json_schema(), "additionalProperties": False}  # as strict as the client's parse
LABEL_FORMAT = {"type": "json_schema", "name": "Label", "schema": LABEL_SCHEMA, "strict": True}


NESTED = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"name": {"enum": ["a", "b", "c"]}, "price": {"type": "number", "minimum": 0}},
                "required": ["name", "price"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["items", "paid"],
    "additionalProperties": False,
}


def post(server, body):
    return httpx.post(server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


# ------------------------------------------------------------------------------ one generation path
def test_same_text_as_chat_completions(client):
    messages = image_input("Describe the image.", PHOTO)
    instructions = "You answer briefly."
    chat = client.chat.completions.create(
        model="fastvlm", messages=as_chat(messages, instructions), max_tokens=12, temperature=0
    )
    r = client.responses.create(
        model="fastvlm", input=messages, instructions=instructions, max_output_tokens=12, temperature=0
    )
    expected = chat.choices[0].message.content
    assert r.output_text == expected and expected
    assert r.id.startswith("resp_") and r.object == "response" and r.created_at > 0 and r.instructions == instructions
    (message,) = r.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert [c.type for c in message.content] == ["output_text"] and message.content[0].annotations == []
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens > 0  # the chat request's prompt: from the cache
    finished = chat.choices[0].finish_reason
    assert (r.status, message.status) == (("incomplete",) * 2 if finished == "length" else ("completed",) * 2)
    assert r.to_dict()["store"] is False and r.tools == [] and r.text.format.type == "text"


def test_string_input_and_two_images(client):
    r = client.responses.create(model="fastvlm", input="Say hello.", max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(
        model="fastvlm", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content
    messages = image_input("Compare the two images.", PHOTO, PHOTO2)
    r = client.responses.create(model="fastvlm", input=messages, max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="fastvlm", messages=as_chat(messages), max_tokens=8, temperature=0)
    assert r.output_text == chat.choices[0].message.content


# ------------------------------------------------------------------------------ structured output
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (1.0, 2)])
def test_parse_returns_an_instance(client, temperature, seed):
    r = client.responses.parse(
        model="fastvlm", input=image_input("Label the object.", PHOTO), text_format=Label,
        max_output_tokens=64, temperature=temperature, extra_body={"seed": seed},
    )  # fmt: skip
    assert r.status == "completed", r.output_text
    assert isinstance(r.output_parsed, Label)
    jsonschema.validate(json.loads(r.output_text), LABEL_SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Label"


def test_json_schema_and_json_object_validate(client):
    fmt = {"type": "json_schema", "name": "receipt", "schema": NESTED, "strict": True}
    for seed in (3, 4):
        r = client.responses.create(
            model="fastvlm", input=image_input("Read the receipt.", PHOTO2), text={"format": fmt},
            max_output_tokens=MAX_TOKENS_LIMIT, temperature=1.0, extra_body={"seed": seed},
        )  # fmt: skip
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), NESTED)
    r = client.responses.create(
        model="fastvlm", input="Give a JSON object.", text={"format": {"type": "json_object"}}, max_output_tokens=64,
        temperature=0,
    )  # fmt: skip
    if r.status == "completed":  # an object of unbounded keys may not close in time; a prefix must still be JSON
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.startswith("{") and r.incomplete_details.reason == "max_output_tokens"


# ------------------------------------------------------------------------------ streaming
START = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def stream_events(client, **kw):
    events = list(client.responses.create(model="fastvlm", stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = len(kinds) - len(START) - len(END) - 1
    assert kinds == START + ["response.output_text.delta"] * deltas + END + [kinds[-1]], kinds
    assert deltas > 0
    return events


def test_stream_deltas_join_to_the_final_output(client):
    request = dict(input=image_input("Label the object.", PHOTO), max_output_tokens=64, temperature=0)
    fmt = LABEL_FORMAT
    events = stream_events(client, text={"format": fmt}, **request)
    final = events[-1]
    assert final.type == "response.completed" and final.response.status == "completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.response.output_text == events[-4].text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.response.usage.output_tokens > 0
    jsonschema.validate(json.loads(text), LABEL_SCHEMA)
    once = client.responses.create(model="fastvlm", text={"format": fmt}, **request)
    assert once.output_text == text  # streamed or not, the same greedy answer
    with client.responses.stream(model="fastvlm", text_format=Label, **request) as stream:
        assert isinstance(stream.get_final_response().output_parsed, Label)  # the client's stream helper


def test_max_output_tokens_cut_is_incomplete(client):
    fmt = LABEL_FORMAT
    request = dict(input=image_input("Label the object.", PHOTO), text={"format": fmt}, max_output_tokens=2)
    r = client.responses.create(model="fastvlm", **request)  # two tokens cannot close a JSON object
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 2
    events = stream_events(client, **request)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == r.output_text


# ------------------------------------------------------------------------------ bad input
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    good = {"model": "fastvlm", "input": "Hi.", "max_output_tokens": 2}
    image = {"type": "input_image", "image_url": "data:image/png;base64,aGVsbG8="}
    cases = [
        ({**good, "tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({**good, "reasoning": {"effort": "low"}}, "reasoning"),
        ({**good, "previous_response_id": "resp_1"}, "previous_response_id"),
        ({**good, "input": [{"role": "user", "content": [image]}]}, "input[0].content[0]"),
        ({**good, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({**good, "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "function_call_output"),
        ({**good, "input": []}, "input"),
        ({**good, "max_output_tokens": 0}, "max_output_tokens"),
        ({**good, "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wat"}}}}, "schema"),
        ({**good, "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "name"),
        ({**good, "text": {"format": {"type": "xml"}}}, "format"),
    ]
    for body, word in cases:
        assert_error(post(server, body), 400, word)
    assert_error(
        httpx.post(server.url + "/v1/responses", content=b"{", headers={"Authorization": f"Bearer {KEY}"}, timeout=60),
        400,
        "JSON",
    )
    overflow = {**good, "input": "word " * 2000}  # past the fixture's context: refused when it reaches the batch
    assert_error(post(server, overflow), 400, "context_length_exceeded", '"param": "input"')
    events = list(client.responses.create(stream=True, **overflow))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2].code == "context_length_exceeded" and events[3].response.status == "failed"
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="fastvlm", input="Hi.", previous_response_id="resp_1")
    r = client.responses.create(**good)
    assert r.status == "incomplete" and r.usage.output_tokens == 2  # still serving
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
