"""StructuredOutputsParams -> an llguidance grammar, and the API-side check of a JSON schema.

No torch and no tokenizer: the server process can call `validate_structured_outputs` to answer
400 before a request reaches a worker (~0.2 ms for a small schema; importing llguidance takes
0.05 s warm, 0.6 s from a cold disk). The worker's GrammarCompiler (structured_output.py)
builds its matchers from the same `grammar_for` string, so both sides accept and refuse the
same schemas.

json_object is compiled as the schema {"type": "object"}, as vLLM does: the output is one JSON
object. Whitespace between tokens is allowed (models write `{"a": 1}` and pretty-printed JSON)
but each run is capped at MAX_WHITESPACE_RUN characters, so a model cannot stall in an endless
run of spaces or newlines while every other token is masked: the known failure mode of
unbounded whitespace in JSON grammars.
"""

from __future__ import annotations

import json

import llguidance

from csps.request import StructuredOutputsParams

MAX_WHITESPACE_RUN = 32  # characters; a newline plus 8 levels of 4-space indent fits
JSON_OBJECT_SCHEMA = {"type": "object"}
_OPTIONS = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE_RUN}}}"}


def schema_of(spec: StructuredOutputsParams) -> dict | bool:
    """The JSON schema a spec stands for; ValueError if its `json` is not JSON."""
    if spec.json_object:
        return JSON_OBJECT_SCHEMA
    try:
        return json.loads(spec.json)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"structured outputs: the JSON schema is not valid JSON: {exc}") \
            from None


def grammar_for(spec: StructuredOutputsParams,
                tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The llguidance grammar (a JSON string) for a spec, checked; ValueError naming what is
    wrong with the schema (bad JSON, wrong types of keywords, unsatisfiable, bad regex)."""
    schema = schema_of(spec)
    if not isinstance(schema, dict | bool):
        raise ValueError(f"structured outputs: a JSON schema must be an object or a boolean, "
                         f"got {type(schema).__name__}")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                           overrides=_OPTIONS)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise ValueError(f"structured outputs: invalid JSON schema: {'; '.join(messages)}")
    return grammar


def validate_structured_outputs(spec: StructuredOutputsParams) -> None:
    """Raise ValueError (message fit for a 400) if the spec's JSON schema is invalid."""
    grammar_for(spec)
