"""OpenAI's `response_format` -> the engine's StructuredOutputsParams (vLLM's mapping):
{"type": "text"} is no constraint, {"type": "json_object"} any JSON object, and
{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}} JSON valid under the
schema. Anything else raises ValueError naming response_format."""

from __future__ import annotations

import json

from csps.request import StructuredOutputsParams


def response_format_to_structured_outputs(
        response_format: dict | None) -> StructuredOutputsParams | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format of type json_schema needs "
                             "`json_schema.schema`, a JSON schema object")
        return StructuredOutputsParams(json=json.dumps(schema))
    raise ValueError(f"response_format type must be one of 'text', 'json_object', "
                     f"'json_schema', got {kind!r}")
