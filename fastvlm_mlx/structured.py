"""Structured output: answers that match a JSON Schema, a regular expression, a list of choices or a Lark grammar.

llguidance compiles what the caller asks for into a grammar and keeps, per sequence, a matcher that says which
tokens can continue it.  ``GrammarMask`` is the logits processor that applies that mask; ``Sampling.processors``
adds one per sequence (``Sampling.constraint`` holds the compiled grammar, plain text, so that it travels to
other ranks like every other sampling field).  The mask is built with MLX array operations, so it runs on
every backend, the CPU included.

    constraint = constrain(schema=Receipt)          # a pydantic model, a JSON Schema dict, regex=, choices=, ...
    text = generate(model, processor, "Read the receipt.", image="receipt.jpg", schema=Receipt)
    receipt = constraint.parse(text)                # a Receipt instance
"""

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import FastVLMError

# JSON is generated compact (no whitespace between tokens): a grammar that allows any amount of whitespace
# lets a model pad an answer until max_tokens runs out.
JSON_OPTIONS = {"whitespace_flexible": False}
KEYWORDS = ("response_format", "schema", "regex", "choices", "grammar")  # what the API front-ends take
_VOCABULARIES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class StructuredOutputError(FastVLMError):
    """A schema, regex or grammar that cannot be compiled or uses what is not supported, or an answer that
    ended before it was complete."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency: only a broken install lacks it
        raise FastVLMError(f"structured output needs llguidance (pip install llguidance): {e}") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What an answer must match: ``grammar`` is llguidance's compiled form, ``kind`` and ``schema`` say what
    it came from, ``output_type`` is the pydantic model to parse into (if one was given)."""

    kind: str  # "json_schema", "json_object", "regex", "choice" or "grammar"
    grammar: str
    schema: dict | None = None
    output_type: type | None = None

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json_object")

    def parse(self, text: str, finish_reason: str | None = None) -> Any:
        """The answer as a value: the pydantic instance, the decoded JSON, or the text itself.  An answer cut
        by max_tokens (``finish_reason`` "length") is refused: it is a valid prefix, not a valid answer."""
        if finish_reason == "length":
            raise StructuredOutputError("the answer reached max_tokens before it was complete; allow more tokens")
        if not self.is_json:
            return text
        try:
            if self.output_type is not None:
                return self.output_type.model_validate_json(text)
            return json.loads(text)
        except ValueError as e:
            raise StructuredOutputError(f"the answer is not complete JSON of the schema: {e}") from None


def _one_line(message: str) -> str:
    """llguidance's messages span lines (the grammar's source with a caret under the error): keep the words."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and not re.match(r"^(\^|\d+ \|)", line))


def _compiled(kind: str, grammar: str, what: str, **fields) -> Constraint:
    """Check ``grammar`` now, so that an unsupported feature is refused before any generation."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise StructuredOutputError(f"{what} cannot be used: {_one_line(' '.join(messages))}")
    return Constraint(kind, grammar, **fields)


def _closed(schema):
    """A pydantic model's schema with no extra keys allowed where it does not say otherwise, as OpenAI's client
    sends it: pydantic would drop such keys anyway, and a model should not spend tokens on them."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if closed.get("type") == "object" and "properties" in closed:
        closed.setdefault("additionalProperties", False)
    return closed


def from_schema(schema: dict | str | type, kind: str = "json_schema") -> Constraint:
    """A constraint for a JSON Schema (a dict, its JSON text, or a pydantic model class)."""
    output_type = None
    if isinstance(schema, type):
        if not hasattr(schema, "model_json_schema"):
            raise StructuredOutputError(f"schema: {schema.__name__} is not a pydantic model class")
        output_type, schema = schema, _closed(schema.model_json_schema())
    elif isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"a JSON schema must be an object (got {type(schema).__name__})")
    grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    return _compiled(kind, grammar, "the JSON schema", schema=schema, output_type=output_type)


def from_regex(pattern: str) -> Constraint:
    """A constraint for a regular expression the whole answer matches (Rust ``regex`` syntax, as Python's for
    the common cases; no look-around or back-references)."""
    if not isinstance(pattern, str) or not pattern:
        raise StructuredOutputError("regex: give a non-empty regular expression")
    return _compiled("regex", _llguidance().LLMatcher.grammar_from_regex(pattern), f"the regex {pattern!r}")


def from_choices(options) -> Constraint:
    """A constraint for exactly one of ``options`` (strings)."""
    if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
        raise StructuredOutputError("choices: give a non-empty list of non-empty strings")
    lark = "start: " + " | ".join(json.dumps(o) for o in options)
    return _compiled("choice", _llguidance().LLMatcher.grammar_from_lark(lark), "the choices")


def from_lark(grammar: str) -> Constraint:
    """A constraint for a Lark grammar (llguidance's dialect: ``start`` is the answer; ``%json`` embeds a
    JSON Schema)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise StructuredOutputError("grammar: give the text of a Lark grammar")
    return _compiled("grammar", _llguidance().LLMatcher.grammar_from_lark(grammar), "the grammar")


def from_response_format(response_format: dict | type) -> Constraint | None:
    """OpenAI's ``response_format``: ``{"type": "json_schema", "json_schema": {"schema": ...}}``,
    ``{"type": "json_object"}`` or ``{"type": "text"}`` (None: no constraint); a pydantic model class too."""
    if isinstance(response_format, Constraint):
        return response_format
    if isinstance(response_format, type):
        return from_schema(response_format)
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return from_schema({"type": "object"}, kind="json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise StructuredOutputError("response_format: a json_schema format needs json_schema.schema")
        return from_schema(spec["schema"])
    raise StructuredOutputError(
        f"response_format: unknown type {kind!r} (expected 'json_schema', 'json_object' or 'text')"
    )


def constrain(response_format=None, *, schema=None, regex=None, choices=None, grammar=None) -> Constraint | None:
    """The one constraint the API's keywords ask for (None for free text); at most one may be given."""
    given = {
        k: v
        for k, v in dict(
            response_format=response_format, schema=schema, regex=regex, choices=choices, grammar=grammar
        ).items()
        if v is not None
    }
    if len(given) > 1:
        raise StructuredOutputError(f"give one of {', '.join(KEYWORDS)}, not {' and '.join(given)}")
    if not given:
        return None
    ((name, value),) = given.items()
    makers = dict(
        response_format=from_response_format,
        schema=from_schema,
        regex=from_regex,
        choices=from_choices,
        grammar=from_lark,
    )
    return makers[name](value)


def pop_constraint(options: dict) -> Constraint | None:
    """Take the structured-output keywords out of ``options`` (a front-end's keyword arguments)."""
    return constrain(**{k: options.pop(k) for k in KEYWORDS if k in options})


def vocabulary(tokenizer):
    """llguidance's view of the tokenizer (byte-level BPE pieces, special tokens, the end-of-turn tokens as its
    end), built once per tokenizer."""
    found = _VOCABULARIES.get(tokenizer)
    if found is None:
        from llguidance.hf import from_tokenizer

        found = from_tokenizer(tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids))
        _VOCABULARIES[tokenizer] = found
    return found


class GrammarMask:
    """The logits processor of one sequence: only tokens that continue the grammar keep their logits.

    mlx-lm calls it once per step with the sequence's tokens, the last of which is the one sampled at the
    step before (on the first call, the prompt's last token), so that token is fed to the matcher first."""

    def __init__(self, tokenizer, grammar: str):
        self.matcher = _llguidance().LLMatcher(vocabulary(tokenizer), grammar, log_level=0)
        self._started = False
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise StructuredOutputError(f"structured output failed: {_one_line(self.matcher.get_error())}")

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # the forward pass does not need the mask: start it now, and compute the mask on the CPU meanwhile
        mx.async_eval(logits)
        if self._started:
            self.matcher.consume_token(tokens[-1].item())
            self._check()
        self._started = True
        # the bitmask's bit i of word j is token 32 j + i: unpacked on the CPU by numpy in one pass (cheaper than
        # a graph of MLX shifts over every word at every step); rows past the tokenizer's vocabulary (padding of
        # the embedding table) stay forbidden
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
        n = min(bits.size, allowed.size)
        allowed[:n] = bits[:n]
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, logits.dtype))
