"""What more than one wire format module needs, written once: lenient readers of JSON values, the neutral
generation settings under a dialect's names, and the classifier a stream decoder raises with.

Why a module of its own: `base.py` is the HTTP exchange every adapter shares, and a vendor module
(`anthropic.py`, `openai.py`, `gemini.py` and their `*_app.py` sides) holds one wire format only. These
helpers belong to neither: they are the small habits all the wire formats have in common, kept here so
that each copy cannot drift from the others (a bool is never a number, a stop list is copied, the
generation settings keep one order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UpstreamError
from ..messages import ChatRequest

Classifier = Callable[[int, Mapping[str, str], bytes], UpstreamError]
"""`Adapter.classify` as a stream decoder uses it: an in-band error event becomes the error its status
would have been over HTTP."""


def int_or_zero(value: object) -> int:
    """A JSON integer (never a bool: `True` is an int to Python), else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def number_or_none(value: object) -> float | None:
    """A JSON number (never a bool) as a float, else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def str_or_empty(value: object) -> str:
    """A JSON string, else `""`."""
    return value if isinstance(value, str) else ""


def malformed_item(items: list[Any], where: str, noun: str) -> str | None:
    """The first item of a message's content list that no API of the dialect could read: not an object
    with a string `type` (`noun`: the dialect's name for an item), or a text item whose text is no string."""
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            return f"{where}[{index}]: must be a {noun} (an object with a string `type`)"
        if item["type"] == "text" and not isinstance(item.get("text"), str):
            return f"{where}[{index}].text: must be a string"
    return None


def generation_params(request: ChatRequest, *, max_tokens: str | None, top_p: str, stop: str) -> dict[str, Any]:
    """The generation settings `request` sets, under one wire format's names, in the order max tokens,
    temperature, top-p, stop sequences (`temperature` is spelt alike everywhere). `max_tokens=None` leaves
    the token limit to the caller (Anthropic must always send one, with a default)."""
    params: dict[str, Any] = {}
    if max_tokens is not None and request.max_tokens is not None:
        params[max_tokens] = request.max_tokens
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.top_p is not None:
        params[top_p] = request.top_p
    if request.stop:
        params[stop] = list(request.stop)
    return params
