"""What an app's SDK reads of a successful answer, checked before the answer is used.

A same-dialect answer goes back to the app as the provider sent it, and the official SDKs build their
response objects without validating types: a `"text": 5` from a broken or hostile upstream reaches the
app's code as a number where its types promise a string. A translated answer would lose the field quietly
instead (read as empty). Either way the 200 is not an answer, so `decode_response` raises ValueError with
the first field of the wrong type (`content[0].text: a string expected, got a number`), and the attempt
fails like any unusable 200 (HOSTILE.md U19): retried, then the next target.

Only types are checked, of the fields the SDKs model, where they appear: a field that is missing stays
the provider's business (new API versions add and drop optional fields), unknown fields and unknown
content-block types pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list", bool: "a boolean"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _NAMES.get(type(value), type(value).__name__)


def _wrong(body: dict[str, Any], where: str, fields: Mapping[str, tuple[type, ...]]) -> str | None:
    """The first of `fields` present in `body` with none of its types (`None` in a tuple: null allowed)."""
    for name, types in fields.items():
        if name not in body:
            continue
        value = body[name]
        if value is None and type(None) in types:
            continue
        if isinstance(value, bool) and bool not in types:
            ok = False  # JSON true is no integer, whatever Python says
        else:
            ok = isinstance(value, tuple(t for t in types if t is not type(None)))
        if not ok:
            wanted = " or ".join("null" if t is type(None) else _NAMES[t] for t in types)
            return f"{where}{name}: {wanted} expected, got {_kind(value)}"
    return None


_STR = (str,)
_INT = (int,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))

_ANTHROPIC_MESSAGE = {"id": _STR, "type": _STR, "role": _STR, "model": _STR, "stop_reason": _OPT_STR,
                      "stop_sequence": _OPT_STR, "usage": (dict,)}
_ANTHROPIC_USAGE = {"input_tokens": _INT, "output_tokens": _INT, "cache_creation_input_tokens": _OPT_INT,
                    "cache_read_input_tokens": _OPT_INT}
_ANTHROPIC_BLOCKS: dict[str, Mapping[str, tuple[type, ...]]] = {
    "text": {"text": _STR, "citations": (list, type(None))},
    "tool_use": {"id": _STR, "name": _STR, "input": (dict,)},
    "thinking": {"thinking": _STR, "signature": _STR},
    "redacted_thinking": {"data": _STR},
}


def anthropic_message_problem(body: dict[str, Any]) -> str | None:
    """A Messages answer whose fields the Anthropic SDK reads have the wrong type (`content` is a list)."""
    problem = _wrong(body, "", _ANTHROPIC_MESSAGE)
    if problem is None and isinstance(body.get("usage"), dict):
        problem = _wrong(body["usage"], "usage.", _ANTHROPIC_USAGE)
    for index, block in enumerate(body.get("content") or ()):
        if problem is not None:
            break
        where = f"content[{index}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return f"{where}: a content block (an object with a string type) expected, got {_kind(block)}"
        problem = _wrong(block, where + ".", _ANTHROPIC_BLOCKS.get(block["type"], {}))
    return problem


_OPENAI_COMPLETION = {"id": _STR, "object": _STR, "created": _INT, "model": _STR, "choices": (list,),
                      "usage": (dict, type(None))}
_OPENAI_USAGE = {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT}
_OPENAI_CHOICE = {"index": _INT, "finish_reason": _OPT_STR, "message": (dict,)}
_OPENAI_MESSAGE = {"role": _STR, "content": (str, list, type(None)), "refusal": _OPT_STR,
                   "tool_calls": (list, type(None))}
"""`content` as a list of parts is what some OpenAI-compatible servers answer; `content_text` reads it."""
_OPENAI_TOOL_CALL = {"id": _STR, "type": _STR, "function": (dict,)}
_OPENAI_FUNCTION = {"name": _STR, "arguments": _STR}


def openai_completion_problem(body: dict[str, Any]) -> str | None:
    """A chat completion whose fields the OpenAI SDK reads have the wrong type."""
    problem = _wrong(body, "", _OPENAI_COMPLETION)
    if problem is None and isinstance(body.get("usage"), dict):
        problem = _wrong(body["usage"], "usage.", _OPENAI_USAGE)
    for index, choice in enumerate(body.get("choices") or ()):
        if problem is not None:
            break
        where = f"choices[{index}]"
        if not isinstance(choice, dict):
            return f"{where}: an object expected, got {_kind(choice)}"
        problem = _wrong(choice, where + ".", _OPENAI_CHOICE)
        message = choice.get("message")
        if problem is None and isinstance(message, dict):
            problem = _wrong(message, where + ".message.", _OPENAI_MESSAGE)
            for position, call in enumerate(message.get("tool_calls") or ()):
                if problem is not None:
                    break
                at = f"{where}.message.tool_calls[{position}]"
                if not isinstance(call, dict):
                    return f"{at}: an object expected, got {_kind(call)}"
                problem = _wrong(call, at + ".", _OPENAI_TOOL_CALL)
                if problem is None and isinstance(call.get("function"), dict):
                    problem = _wrong(call["function"], at + ".function.", _OPENAI_FUNCTION)
    return problem
