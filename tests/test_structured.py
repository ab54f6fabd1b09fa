"""Structured output through the Python API, proven by independent checkers: the ``jsonschema`` package for
JSON Schemas, Python's ``re.fullmatch`` for regexes, list membership for choices.

The fixture model has random weights, so only the grammar's mask makes its answers valid: every answer that
ends (finish_reason "stop") must validate, whatever the weights pick.  Unbounded strings rarely close under
random weights, so the schemas bound theirs (maxLength, enum, pattern, format) and most answers end.  Each
grammar runs at temperature 1.0 over three seeds and greedily, batched (``BatchDecoder``, as the server and
batch captioner decode) and alone (``stream_generate``); the two decode paths give the same answers.
"""

import datetime
import json
import re
from typing import Literal

import jsonschema
import llguidance
import pytest
from conftest import FIXTURES, PHOTO
from pydantic import BaseModel, ConfigDict, Field

import fastvlm_mlx
from fastvlm_mlx import ChatSession, StructuredOutputError, load, stream_generate
from fastvlm_mlx.engine import Sampling, engine_for
from fastvlm_mlx.structured import constrain

MODEL = str(FIXTURES / "format_a")
PROMPT = "Describe the image as JSON."
MAX_TOKENS = 300  # the fixture's context is 512 positions; the prompt with its image takes 69
RUNS = [(1.0, 0), (1.0, 1), (1.0, 2), (0.0, None)]  # (temperature, seed)
TEMPERATURE_1 = [r for r in RUNS if r[0] == 1.0]


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false (else any extra key may follow)
    name: str = Field(max_length=6)
    quantity: int = Field(ge=1, le=20)
    unit: Literal["kg", "g", "each"]


class Receipt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shop: str = Field(max_length=10, pattern=r"^[A-Za-z ]+$")
    kind: Literal["grocery", "fuel", "other"]
    lines: list[Line] = Field(min_length=1, max_length=3)
    total: float = Field(ge=0, le=1000)
    paid: bool


def s(max_length=8, **extra):
    return dict(type="string", maxLength=max_length, **extra)


def obj(properties: dict, required=None, **extra):
    return dict(
        type="object",
        properties=properties,
        required=list(properties) if required is None else required,
        additionalProperties=False,
        **extra,
    )


# recursive: each level chooses between going deeper and an end a random-weight model takes often enough
LINKED = {
    "$defs": {
        "node": obj(
            {
                "label": {"enum": ["a", "b"]},
                "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "array", "maxItems": 0}]},
            }
        )
    },
    "$ref": "#/$defs/node",
}
NESTED_LISTS = {
    "$defs": {
        "list": {
            "type": "array",
            "items": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"$ref": "#/$defs/list"}]},
            "maxItems": 3,
        }
    },
    "$ref": "#/$defs/list",
}

SCHEMAS = {
    "string": s(),
    "string_min_max": s(6, minLength=2),
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "type_list": {"type": ["integer", "null", "boolean"]},
    "enum_strings": {"enum": ["red", "green", "blue", "light blue"]},
    "enum_mixed": {"enum": ["on", 1, 2.5, True, None]},
    "const": {"const": "FastVLM"},
    "const_object": obj({"version": {"const": 2}, "name": {"const": "receipt"}}),
    "integer_bounds": {"type": "integer", "minimum": -5, "maximum": 12},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
    "number_bounds": {"type": "number", "minimum": -1.5, "maximum": 2.25},
    "number_exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "array_of_integers": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
    "array_min_max": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2, "maxItems": 3},
    "array_of_objects": {"type": "array", "items": obj({"id": {"type": "integer"}, "ok": {"type": "boolean"}})},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer"}, s(4)], "items": False, "minItems": 2},
    "object_required": obj({"a": {"type": "integer"}, "b": s(), "c": {"type": "boolean"}}, required=["a"]),
    "object_optional_only": obj({"x": {"type": "integer"}, "y": {"type": "null"}}, required=[]),
    "nested_objects": obj(
        {
            "photo": obj({"width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1}}),
            "subject": obj({"kind": {"enum": ["dog", "cat", "shape"]}, "colour": s(6)}),
        }
    ),
    "deeply_nested": obj({"a": obj({"b": obj({"c": obj({"d": {"type": "boolean"}})})})}),
    "pattern": s(12, pattern=r"^[A-Z]{2}-[0-9]{3}$"),
    "pattern_in_object": obj({"code": {"type": "string", "pattern": r"^#[0-9a-f]{6}$"}, "n": {"type": "integer"}}),
    "format_date": {"type": "string", "format": "date"},
    "format_date_time": {"type": "string", "format": "date-time"},
    "format_email": obj({"email": {"type": "string", "format": "email", "maxLength": 24}}),
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "format_ipv6": {"type": "string", "format": "ipv6", "maxLength": 20},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0}, s(5), obj({"z": {"type": "null"}})]},
    "one_of_disjoint": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    "all_of": {"allOf": [obj({"a": {"type": "integer"}}, required=["a"]), {"required": ["a"]}]},
    "ref_defs": {
        "$defs": {"point": obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "ref_recursive_linked": LINKED,
    "ref_recursive_nested_lists": NESTED_LISTS,
    "pydantic_receipt": Receipt.model_json_schema(),
}

REGEXES = {
    "phone": r"[0-9]{3}-[0-9]{4}",
    "yes_no": r"(yes|no|maybe)",
    "email": r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    "colour": r"#[0-9a-fA-F]{6}",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "words": r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}",
    "decimal": r"-?[0-9]{1,3}(\.[0-9]{1,2})?",
    "not_digits": r"[^0-9\n]{1,6}",
    "alternation_prefixes": r"(cat|cats|category)[.!]",
}

CHOICES = {
    "animals": ["dog", "cat", "bird"],
    "prefixes": ["cat", "cats", "category", "catalogue"],
    "sentences": ["A dog on grass.", "A red square.", "Nothing to see."],
    "unicode": ["café", "naïve", "über"],
}

LARK = r"""
start: "colour=" COLOUR ";size=" SIZE
COLOUR: "red" | "green" | "blue"
SIZE: /[1-9][0-9]{0,2}/
"""
LARK_REGEX = r"colour=(red|green|blue);size=[1-9][0-9]{0,2}"

# RFC 3339 date-time (jsonschema checks "date-time" only with an optional package): the standard library's
# parser, with the time zone RFC 3339 requires and its leap second (23:59:60) allowed
FORMAT_CHECKER = jsonschema.FormatChecker()


@FORMAT_CHECKER.checks("date-time", raises=ValueError)
def _date_time(text) -> bool:
    if not isinstance(text, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", text
    ):
        return False
    parsed = datetime.datetime.fromisoformat(re.sub(r":60(?=[.Zz+-])", ":59", text.upper()))
    return parsed.tzinfo is not None


def validate(schema: dict, text: str) -> None:
    """Raise unless ``text`` is JSON that ``schema`` accepts (formats checked)."""
    jsonschema.validate(json.loads(text), schema, format_checker=FORMAT_CHECKER)


def compact(text: str) -> bool:
    """No whitespace outside JSON strings."""
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped = not escaped and ch == "\\"
            in_string = escaped or ch != '"'
        elif ch == '"':
            in_string = True
        elif ch.isspace():
            return False
    return True


@pytest.fixture(scope="module")
def engine():
    return engine_for(*load(MODEL))


def request(engine):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": PROMPT}]}]
    return engine.prepare(messages)


def decode_batched(engine, jobs: list[tuple], max_batch: int = 16) -> list[tuple[str, str]]:
    """(text, finish_reason) of each ``(grammar, temperature, seed)`` job, decoded in batches of ``max_batch``."""
    decoder = engine.decoder(max_batch=max_batch)
    prompt = request(engine)
    results = []
    for first in range(0, len(jobs), max_batch):
        chunk = jobs[first : first + max_batch]
        admitted = decoder.admit(
            [
                (prompt, Sampling(max_tokens=MAX_TOKENS, temperature=t, seed=seed, constraint=grammar))
                for grammar, t, seed in chunk
            ]
        )
        texts = {a.uid: [] for a in admitted}
        finish = {}
        while decoder.running:
            for token in decoder.step():
                texts[token.uid].append(token.text)
                if token.finish_reason is not None:
                    assert token.error is None, token.error
                    finish[token.uid] = token.finish_reason
        results += [("".join(texts[a.uid]), finish[a.uid]) for a in admitted]
    return results


def decode_single(model_and_processor, temperature, seed, max_tokens=MAX_TOKENS, **constraint) -> tuple[str, str]:
    responses = list(
        stream_generate(
            *model_and_processor,
            PROMPT,
            image=str(PHOTO),
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            **constraint,
        )
    )
    return "".join(r.text for r in responses), responses[-1].finish_reason


@pytest.fixture(scope="module")
def batched(engine):
    """Every schema, regex, choice list and the Lark grammar at every (temperature, seed) of RUNS, batched."""
    grammars = {("schema", k): constrain(schema=v) for k, v in SCHEMAS.items()}
    grammars |= {("regex", k): constrain(regex=v) for k, v in REGEXES.items()}
    grammars |= {("choices", k): constrain(choices=v) for k, v in CHOICES.items()}
    grammars[("grammar", "lark")] = constrain(grammar=LARK)
    jobs = [(key, t, seed) for key in grammars for t, seed in RUNS]
    outputs = decode_batched(engine, [(grammars[key].grammar, t, seed) for key, t, seed in jobs])
    return dict(zip(jobs, outputs))


@pytest.fixture(scope="module")
def model_and_processor(engine):
    return engine.model, engine.processor


# ------------------------------------------------------------------------------------ validity
def test_schema_count():
    assert len(SCHEMAS) >= 30 and len(REGEXES) >= 8


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_finished_answer_validates(batched, name):
    runs = [batched[("schema", name), t, seed] for t, seed in RUNS]
    finished = [text for text, reason in runs if reason == "stop"]
    assert finished, f"no answer to {name} finished within {MAX_TOKENS} tokens: {runs}"
    for text in finished:
        validate(SCHEMAS[name], text)
        assert compact(text), text


@pytest.mark.parametrize("name", REGEXES)
def test_every_finished_answer_matches_the_regex(batched, name):
    runs = [batched[("regex", name), t, seed] for t, seed in RUNS]
    assert all(reason == "stop" for _, reason in runs), runs
    for text, _ in runs:
        assert re.fullmatch(REGEXES[name], text), (name, text)


@pytest.mark.parametrize("name", CHOICES)
def test_every_answer_is_one_of_the_choices(batched, name):
    for t, seed in RUNS:
        text, reason = batched[("choices", name), t, seed]
        assert reason == "stop" and text in CHOICES[name], (t, seed, text)


def test_lark_grammar_answers_match(batched):
    for t, seed in RUNS:
        text, reason = batched[("grammar", "lark"), t, seed]
        assert reason == "stop" and re.fullmatch(LARK_REGEX, text), (t, seed, text)


def test_most_answers_finish(batched):
    """Bounded grammars and compact JSON leave a random-weight model nowhere to ramble: nearly all finish."""
    reasons = [reason for _, reason in batched.values()]
    assert reasons.count("stop") >= 0.9 * len(reasons), reasons.count("stop") / len(reasons)


def test_free_answers_would_not_validate(engine):
    """The control: the same model unconstrained answers no schema (so the mask is what makes answers valid)."""
    prompt, valid = request(engine), 0
    for seed in range(3):
        text = "".join(r.text for r in engine.stream(prompt, Sampling(max_tokens=40, temperature=1.0, seed=seed)))
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass
    assert valid == 0


# --------------------------------------------------------------- the two decode paths agree
SINGLE_SCHEMAS = ["nested_objects", "ref_recursive_linked", "pydantic_receipt", "format_date_time", "any_of"]


@pytest.mark.parametrize("name", SINGLE_SCHEMAS)
def test_single_path_gives_the_batched_answers(batched, model_and_processor, name):
    for t, seed in [RUNS[0], RUNS[-1]]:
        text, reason = decode_single(model_and_processor, t, seed, schema=SCHEMAS[name])
        assert (text, reason) == batched[("schema", name), t, seed]
        if reason == "stop":
            validate(SCHEMAS[name], text)


def test_single_path_regex_choices_and_lark(batched, model_and_processor):
    t, seed = RUNS[1]
    assert decode_single(model_and_processor, t, seed, regex=REGEXES["email"]) == batched[("regex", "email"), t, seed]
    got = decode_single(model_and_processor, t, seed, choices=CHOICES["prefixes"])
    assert got == batched[("choices", "prefixes"), t, seed]
    assert decode_single(model_and_processor, t, seed, grammar=LARK) == batched[("grammar", "lark"), t, seed]


# ----------------------------------------------------------------------------------- the API
def test_parse_returns_a_pydantic_instance(model_and_processor):
    for seed in (0, 1):
        receipt = fastvlm_mlx.parse(
            *model_and_processor, PROMPT, image=str(PHOTO), schema=Receipt, temperature=1.0, seed=seed, max_tokens=300
        )
        assert isinstance(receipt, Receipt) and all(isinstance(line, Line) for line in receipt.lines)
        validate(Receipt.model_json_schema(), receipt.model_dump_json())


def test_parse_of_a_dict_schema_returns_the_json(model_and_processor):
    value = fastvlm_mlx.parse(*model_and_processor, PROMPT, image=str(PHOTO), schema=SCHEMAS["nested_objects"])
    jsonschema.validate(value, SCHEMAS["nested_objects"])
    assert fastvlm_mlx.parse(*model_and_processor, "Pick.", choices=CHOICES["animals"]) in CHOICES["animals"]


def test_response_format_json_schema_and_json_object(model_and_processor):
    schema = SCHEMAS["ref_defs"]
    response_format = {"type": "json_schema", "json_schema": {"name": "segment", "schema": schema, "strict": True}}
    text = fastvlm_mlx.generate(*model_and_processor, PROMPT, image=str(PHOTO), response_format=response_format)
    validate(schema, text)
    finished = 0
    for seed in range(4):
        text, reason = decode_single(model_and_processor, 1.0, seed, response_format={"type": "json_object"})
        if reason == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict) and compact(text), text
    assert finished, "no json_object answer finished"
    free = decode_single(model_and_processor, 1.0, 7, max_tokens=40)
    assert decode_single(model_and_processor, 1.0, 7, max_tokens=40, response_format={"type": "text"}) == free


def test_chat_session_keeps_its_schema_per_turn(model_and_processor):
    chat = ChatSession(*model_and_processor)
    first = chat.parse("What is in the photo?", str(PHOTO), schema=Receipt, temperature=1.0, seed=3, max_tokens=200)
    assert isinstance(first, Receipt)
    second = chat.ask("And the colour?", schema=SCHEMAS["nested_objects"], max_tokens=120)
    validate(SCHEMAS["nested_objects"], second)
    third = chat.parse("One word.", choices=CHOICES["animals"], max_tokens=20)
    assert third in CHOICES["animals"]
    assert [m["role"] for m in chat.messages[-6:]] == ["user", "assistant"] * 3
    assert Receipt.model_validate_json(chat.messages[-5]["content"]) == first
    assert chat.messages[-3]["content"] == second


def test_an_answer_cut_by_max_tokens_is_refused_by_parse(model_and_processor):
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        fastvlm_mlx.parse(*model_and_processor, PROMPT, image=str(PHOTO), schema=Receipt, max_tokens=3)
    text, reason = decode_single(model_and_processor, 0.0, None, max_tokens=3, schema=Receipt)
    assert reason == "length" and len(text) > 0


# ------------------------------------------------------------------------- refused up front
UNSUPPORTED = [
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
]


@pytest.mark.parametrize("schema,name", UNSUPPORTED, ids=[n for _, n in UNSUPPORTED])
def test_unsupported_schema_features_are_refused_by_name(model_and_processor, schema, name):
    calls = []

    def spy(tokens, logits):
        calls.append(1)
        return logits

    with pytest.raises(StructuredOutputError, match=re.escape(name)) as refused:
        fastvlm_mlx.generate(*model_and_processor, "Hi.", schema=schema, logits_processors=[spy], max_tokens=4)
    assert "\n" not in str(refused.value)
    assert calls == []  # refused before any token was generated


BAD_REQUESTS = [
    (dict(regex="(ab"), "regex"),
    (dict(regex="[a-"), "regex"),
    (dict(regex=""), "regex"),
    (dict(grammar="start: foo"), "grammar"),
    (dict(grammar="start: ("), "grammar"),
    (dict(grammar="  "), "grammar"),
    (dict(choices=[]), "choices"),
    (dict(choices=["a", ""]), "choices"),
    (dict(choices="abc"), "choices"),
    (dict(schema=["not", "an", "object"]), "object"),
    (dict(schema="{not json"), "not valid JSON"),
    (dict(schema=int), "pydantic"),
    (dict(schema={"type": "string"}, regex="a+"), "schema and regex"),
    (dict(choices=["a"], grammar=LARK), "choices and grammar"),
    (dict(response_format={"type": "yaml"}), "unknown type"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "json_schema.schema"),
]


@pytest.mark.parametrize("options,words", BAD_REQUESTS, ids=[str(o)[:40] for o, _ in BAD_REQUESTS])
def test_bad_requests_are_refused_with_one_line(model_and_processor, options, words):
    with pytest.raises(StructuredOutputError, match=re.escape(words)) as refused:
        fastvlm_mlx.generate(*model_and_processor, "Hi.", max_tokens=4, **options)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------ whitespace
def test_json_is_compact_so_random_answers_finish(engine):
    """llguidance's default JSON grammar allows whitespace between tokens, which a random-weight model pads
    with; ours is compact.  The control compiles the same schema with flexible whitespace."""
    schema = SCHEMAS["array_of_objects"]
    flexible = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": True})
    ours = constrain(schema=schema).grammar
    seeds = range(6)
    compact_runs = decode_batched(engine, [(ours, 1.0, seed) for seed in seeds])
    flexible_runs = decode_batched(engine, [(flexible, 1.0, seed) for seed in seeds])
    assert all(compact(text) for text, _ in compact_runs)
    assert sum(reason == "stop" for _, reason in compact_runs) >= 5, compact_runs
    assert not all(compact(text) for text, _ in flexible_runs)  # the control: padding appears
