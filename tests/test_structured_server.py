"""Structured output through the server's chat completions, driven by the real `openai` client: response_format
(a pydantic model through ``parse``, a JSON schema, any JSON object), the ``structured_outputs`` extension (regex,
choice, Lark grammar) and forced tool calls.  Every answer is checked by an independent validator (``jsonschema``,
Python's ``re``, pydantic), never by the server's own code.  The fixture model has random weights: only the
constraint can make its answers valid, and schemas bound their strings so that answers end within max_tokens."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest
from conftest import PHOTO, PHOTO2
from test_server import KEY, Server, assert_error, image_turn, post

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install -e '.[test]')")
jsonschema = pytest.importorskip(
    "jsonschema", reason="the structured-output tests need jsonschema (pip install -e '.[test]')"
)
from pydantic import BaseModel, Field  # noqa: E402


class Receipt(BaseModel):
    shop: str = Field(max_length=10)
    kind: Literal["food", "tools", "books"]
    total: int = Field(ge=0, le=999)
    paid: bool


SHELF = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 6},
                    "colour": {"enum": ["red", "green", "blue"]},
                },
                "required": ["label", "colour"],
                "additionalProperties": False,
            },
        },
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
    },
    "required": ["items", "count"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "alarm",
        "description": "Set an alarm.",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "loud": {"$ref": "#/$defs/flag"}},
            "required": ["hour", "loud"],
            "additionalProperties": False,
            "$defs": {"flag": {"type": "boolean"}},  # a reference, resolved within this tool's own schema
        },
    },
}
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ALARM)}
NAMED = {"type": "function", "function": {"name": "weather"}}
SETTINGS = [dict(temperature=0)] + [dict(temperature=1.0, seed=s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--max-batch", "16", "--max-tokens-limit", "256")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, messages=None, **kw):
    messages = messages or [image_turn("Read the receipt.", PHOTO)]
    return client.chat.completions.create(model="fastvlm", messages=messages, **kw)


def json_schema(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def streamed(client, **kw):
    """The streamed answer: its text, its tool call's (name, arguments) if any, and its finish reason."""
    chunks = list(ask(client, stream=True, **kw))
    text, name, arguments, finish, ids = "", None, "", None, set()
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            assert call.index == 0
            ids.add(call.id) if call.id else None
            name = call.function.name or name
            arguments += call.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert len(ids) <= 1 and all(i.startswith("call_") for i in ids)
    return text, (name, arguments) if name else None, finish


# ------------------------------------------------------------------------------ response_format
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"t{s['temperature']}-seed{s.get('seed')}")
def test_parse_returns_the_pydantic_instance(client, settings):
    completion = client.chat.completions.parse(
        model="fastvlm",
        messages=[image_turn("Read the receipt.", PHOTO)],
        response_format=Receipt,
        max_tokens=200,
        **settings,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Receipt)
    jsonschema.validate(json.loads(choice.message.content), Receipt.model_json_schema())
    assert choice.message.parsed == Receipt.model_validate_json(choice.message.content)


def test_streamed_json_schema_joins_to_valid_json(client):
    for settings in SETTINGS:
        text, call, finish = streamed(client, response_format=json_schema(SHELF), max_tokens=200, **settings)
        assert call is None and finish == "stop", (text, finish)
        jsonschema.validate(json.loads(text), SHELF)
        whole = ask(client, response_format=json_schema(SHELF), max_tokens=200, **settings).choices[0]
        assert whole.message.content == text and whole.finish_reason == "stop"


def test_json_object_is_an_object(client):
    completed = 0
    for seed in range(8):
        choice = ask(client, response_format={"type": "json_object"}, max_tokens=64, temperature=1.0, seed=seed)
        choice = choice.choices[0]
        assert choice.message.content.startswith("{"), choice.message.content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            completed += 1
        else:
            assert choice.finish_reason == "length"
    assert completed  # random weights seldom close an object of any shape, but some seeds do


def test_text_format_is_free_text(client):
    free = ask(client, max_tokens=12).choices[0].message.content
    assert ask(client, response_format={"type": "text"}, max_tokens=12).choices[0].message.content == free


def test_answer_cut_by_max_tokens_is_length_and_parse_refuses_it(client):
    cut = ask(client, response_format=json_schema(Receipt.model_json_schema()), max_tokens=4).choices[0]
    assert cut.finish_reason == "length" and cut.message.content.startswith('{"')
    with pytest.raises(ValueError):
        json.loads(cut.message.content)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="fastvlm", messages=[image_turn("Read it.", PHOTO)], response_format=Receipt, max_tokens=4
        )


# ------------------------------------------------------------------------------ structured_outputs
@pytest.mark.parametrize(
    "spec, matches",
    [
        ({"regex": r"[a-z]{2,8}-[0-9]{3}"}, lambda t: re.fullmatch(r"[a-z]{2,8}-[0-9]{3}", t)),
        ({"choice": ["cat", "dog", "red bird"]}, lambda t: t in ("cat", "dog", "red bird")),
        (
            {"grammar": 'start: "ans: " NUM " " WORD\nNUM: /[0-9]{1,3}/\nWORD: "yes" | "no"'},
            lambda t: re.fullmatch(r"ans: [0-9]{1,3} (yes|no)", t),
        ),
        ({"json": SHELF}, lambda t: jsonschema.validate(json.loads(t), SHELF) is None),
    ],
    ids=["regex", "choice", "grammar", "json"],
)
def test_structured_outputs_extension(client, spec, matches):
    answers = set()
    for settings in SETTINGS:
        choice = ask(client, max_tokens=120, extra_body={"structured_outputs": spec}, **settings).choices[0]
        assert choice.finish_reason == "stop" and matches(choice.message.content), choice.message.content
        answers.add(choice.message.content)
        text, _, finish = streamed(client, max_tokens=120, extra_body={"structured_outputs": spec}, **settings)
        assert text == choice.message.content and finish == "stop"
    if "choice" not in spec:  # (the fixture model prefers one of a few short choices at every seed)
        assert len(answers) > 1  # the seeds really differ: the constraint, not a fixed answer, made them valid


# ------------------------------------------------------------------------------ tools
def test_named_tool_call_streamed_and_not(client):
    for settings in SETTINGS:
        r = ask(client, tools=[WEATHER, ALARM], tool_choice=NAMED, max_tokens=120, **settings)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF["weather"])
        text, streamed_call, finish = streamed(client, tools=[WEATHER, ALARM], tool_choice=NAMED, max_tokens=120,
                                               **settings)  # fmt: skip
        assert text == "" and streamed_call == ("weather", call.function.arguments) and finish == "tool_calls"


def test_required_tool_call_picks_one_tool(client):
    picked = set()
    for settings in SETTINGS + [dict(temperature=1.0, seed=s) for s in range(4, 10)]:
        choice = ask(client, tools=[WEATHER, ALARM], tool_choice="required", max_tokens=120, **settings).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
        picked.add(call.function.name)
        _, streamed_call, finish = streamed(client, tools=[WEATHER, ALARM], tool_choice="required", max_tokens=120,
                                            **settings)  # fmt: skip
        assert streamed_call == (call.function.name, call.function.arguments) and finish == "tool_calls"
    assert picked == {"weather", "alarm"}, picked


def test_parse_gives_parsed_tool_arguments(client):
    class GetWeather(BaseModel):
        city: str = Field(max_length=8)
        unit: Literal["c", "f"]

    tool = openai.pydantic_function_tool(GetWeather)
    completion = client.chat.completions.parse(
        model="fastvlm",
        messages=[image_turn("What is the weather where this was taken?", PHOTO2)],
        tools=[tool],
        tool_choice="required",
        max_tokens=80,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_tool_call_cut_by_max_tokens_is_length(client):
    choice = ask(client, tools=[WEATHER], tool_choice=NAMED, max_tokens=3).choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    assert call.function.name == "weather" and call.function.arguments.startswith("{")
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)


# ------------------------------------------------------------------------------ one batch
def test_twelve_mixed_requests_together_equal_each_alone(client):
    """Constrained and free requests share the batch, each with its own mask and sampling."""
    kinds = [
        dict(response_format=json_schema(SHELF)),
        dict(response_format=json_schema(Receipt.model_json_schema(), "receipt")),
        dict(),  # free text
        dict(extra_body={"structured_outputs": {"regex": r"[a-z]{2,8}-[0-9]{3}"}}),
        dict(extra_body={"structured_outputs": {"choice": ["cat", "dog", "red bird"]}}),
        dict(tools=[WEATHER, ALARM], tool_choice="required"),
    ]
    requests = [
        dict(kinds[i % 6], max_tokens=48, **(dict(temperature=0) if i % 2 else dict(temperature=1.0, seed=i)))
        for i in range(12)
    ]
    requests[2]["messages"] = [image_turn("Describe the image.", PHOTO2)]

    def one(kw):
        choice = ask(client, **kw).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason

    alone = [one(kw) for kw in requests]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, requests))
    assert together == alone
    assert {finish for _, _, finish in alone} >= {"stop", "tool_calls"}


# ------------------------------------------------------------------------------ bad input
def test_bad_schemas_and_grammars_are_400_and_the_server_goes_on(server, client):
    good = {"messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 2}
    cases = [
        (dict(good, response_format=json_schema({"not": {"type": "string"}})), "response_format", "not"),
        (dict(good, response_format=json_schema({"type": "object", "properties": 5})), "response_format", "properties"),
        (dict(good, response_format=json_schema({"type": "wizard"})), "response_format", "wizard"),
        (
            dict(good, response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format",
            "schema",
        ),
        (dict(good, response_format={"type": "xml"}), "response_format", "json_schema"),
        (dict(good, structured_outputs={"regex": "[a-"}), "structured_outputs", "regex"),
        (dict(good, structured_outputs={"regex": "(?=a)b"}), "structured_outputs", "look-around"),
        (dict(good, structured_outputs={"grammar": "start: missing_rule"}), "structured_outputs", "missing_rule"),
        (dict(good, structured_outputs={"choice": []}), "structured_outputs", "choices"),
        (dict(good, structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs", "exactly one"),
        (dict(good, structured_outputs={"pattern": "a"}), "structured_outputs", "pattern"),
        (
            dict(good, structured_outputs={"regex": "a"}, response_format={"type": "json_object"}),
            "structured_outputs",
            "not both",
        ),
        (dict(good, tools=[WEATHER]), "tool_choice", "auto"),
        (dict(good, tools=[WEATHER], tool_choice="auto"), "tool_choice", "required"),
        (dict(good, tool_choice="required"), "tool_choice", "tools"),
        (
            dict(good, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
            "nope",
        ),  # fmt: skip
        (
            dict(
                good,
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
                tool_choice="required",
            ),  # fmt: skip
            "tools[0].function.parameters",
            "not",
        ),
        (
            dict(good, tools=[WEATHER], tool_choice=NAMED, response_format={"type": "json_object"}),
            "response_format",
            "tool call",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "20C", "tool_call_id": "x"}]},
            "messages",
            "tool",
        ),
    ]
    for body, param, word in cases:
        response = post(server, body)
        assert_error(response, 400, word)
        assert response.json()["error"]["param"] == param, response.json()
        assert post(server, good).status_code == 200  # and the next good request is answered
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, response_format=json_schema({"not": {}}), max_tokens=2)
    assert "not" in caught.value.message and caught.value.param == "response_format"
    assert ask(client, max_tokens=2).choices[0].finish_reason == "length"
    # a grammar that compiles but names a token this vocabulary lacks fails when admitted, alone
    for stream in (False, True):
        bad = dict(good, structured_outputs={"grammar": "start: <[99999]>"}, stream=stream)
        response = post(server, bad)
        if stream:
            assert "99999" in response.text and '"error"' in response.text
        else:
            assert_error(response, 400, "99999")
        assert post(server, good).status_code == 200
