"""Per-target quality checks (`validate`): an answer that fails its target's bar is a failed attempt.

A fallback model may answer in a different shape; its own check decides whether the answer is usable,
and a failed check sends the request on to the next target. Validators are compiled once per policy.

Checks apply to complete answers. A stream commits at its first token (the app has it by then), so a
streamed answer is never checked: a route that must validate serves its callers without streaming.
"""

from __future__ import annotations

from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from .messages import ChatResponse, ToolCall
from .policy import Validate


class AnswerCheck:
    """Compiled from a target's `validate` block; `problem(response)` is None when the answer passes."""

    __slots__ = ("_max", "_min", "_schema")

    def __init__(self, spec: Validate) -> None:
        self._min = spec.min_chars
        self._max = spec.max_chars
        self._schema: Draft202012Validator | None = None
        if spec.json_schema is not None:
            try:
                Draft202012Validator.check_schema(spec.json_schema)
            except SchemaError as exc:
                raise ValueError(f"invalid jsonSchema: {exc.message}") from None
            self._schema = Draft202012Validator(spec.json_schema)

    def problem(self, response: ChatResponse) -> str | None:
        if any(isinstance(part, ToolCall) for part in response.parts):
            return None  # a tool call is the app's to check, not text to measure
        text = response.text
        if self._min is not None and len(text.strip()) < self._min:
            return f"answer shorter than {self._min} characters"
        if self._max is not None and len(text) > self._max:
            return f"answer longer than {self._max} characters"
        if self._schema is not None:
            try:
                document: Any = orjson.loads(_strip_fences(text))
            except orjson.JSONDecodeError:
                return "answer is not valid JSON"
            error = next(iter(self._schema.iter_errors(document)), None)
            if error is not None:
                # The schema keyword that failed, never `error.message`: it quotes the answer itself, and
                # this text reaches `attempts` and the logs, which never carry completions.
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                return f"answer does not match jsonSchema at {where} (failed: {error.validator})"
        return None


def parse_json_answer(text: str) -> Any:
    """The answer's JSON value, or None when it is not JSON (for the route API's `output.json`)."""
    try:
        return orjson.loads(_strip_fences(text))
    except orjson.JSONDecodeError:
        return None


def _strip_fences(text: str) -> str:
    """Models often wrap JSON in a Markdown code fence; accept it."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped[3:-3]
        newline = stripped.find("\n")
        if newline != -1 and not stripped[:newline].strip().startswith(("{", "[")):
            stripped = stripped[newline + 1 :]
    return stripped
