"""The one internal format the engine speaks.

Provider adapters translate their wire format into these types and back; strategies, validation,
telemetry and the compatible endpoints only ever see these. Plain slotted dataclasses: they are built
on every request, so they must be cheap.

When the app's request arrives in a provider's own format (the compatible endpoints), `ChatRequest.native`
keeps the body as sent, so a target of the same provider receives it verbatim (model swapped) instead
of a lossy round trip; `ChatResponse.native` does the same for the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant"]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal", "other"]


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    """An image: base64 `data` with its media type, or a `url`."""

    media_type: str
    data: str | None = None
    url: str | None = None


@dataclass(slots=True)
class ToolCall:
    """The model asks the app to call a tool; `arguments` is the decoded JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(slots=True)
class ToolResult:
    """The app's answer to a tool call. `name` is the tool's name (Gemini needs it; others ignore it)."""

    call_id: str
    content: str
    is_error: bool = False
    name: str | None = None


Part = Text | Image | ToolCall | ToolResult


@dataclass(slots=True)
class Message:
    role: Role
    parts: list[Part]


@dataclass(slots=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]
    """JSON schema of the arguments."""


@dataclass(slots=True)
class NativeBody:
    """A body in one provider's wire format (`dialect`: anthropic | openai | gemini)."""

    dialect: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    """The app's protocol headers worth keeping on pass-through (`anthropic-beta`, ...); never keys."""


@dataclass(slots=True)
class ChatRequest:
    """A provider-neutral request for one model call."""

    messages: list[Message]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: str | None = None
    """`auto`, `any` (must call some tool), `none`, or a tool name."""
    native: NativeBody | None = None
    """The app's body as sent, when it came through a compatible endpoint."""
    system_override: str | None = None
    """A fallback target's own system prompt; replaces the app's, in native and translated forms."""
    prefill: str | None = None
    """Text the assistant already produced (stream resume): the model continues after it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Target params with no neutral field: merged into the wire body as the provider names them."""
    lossy: list[str] = field(default_factory=list)
    """What the app's native body holds that the neutral fields cannot carry (e.g. an Anthropic document
    block): a target of another dialect refuses the request instead of silently dropping it."""

    @property
    def effective_system(self) -> str | None:
        return self.system_override if self.system_override is not None else self.system

    def transcript(self) -> list[dict[str, str]]:
        """The conversation as plain text, for a policy that opted in to recording content."""
        lines = [{"role": "system", "text": self.effective_system}] if self.effective_system else []
        for message in self.messages:
            text = "".join(
                part.text if isinstance(part, Text) else part.content if isinstance(part, ToolResult) else ""
                for part in message.parts
            )
            lines.append({"role": message.role, "text": text})
        return lines


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class ChatResponse:
    """A complete answer."""

    parts: list[Text | ToolCall]
    stop_reason: StopReason
    usage: Usage
    model: str
    native: NativeBody | None = None
    """The provider's body as received (the compatible endpoint of the same dialect relays it)."""

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, Text))


@dataclass(slots=True)
class StreamStart:
    """The upstream accepted the stream (Anthropic `message_start`, the first OpenAI/Gemini chunk)."""

    model: str
    usage: Usage


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ToolCallStart:
    index: int
    """Position of the tool call among this answer's tool calls (0, 1, ...)."""
    id: str
    name: str


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    arguments: str
    """A fragment of the arguments' JSON text."""


@dataclass(slots=True)
class StreamEnd:
    """The upstream finished the answer properly (Anthropic `message_stop`, OpenAI `[DONE]`, ...)."""

    stop_reason: StopReason
    usage: Usage


StreamEvent = StreamStart | TextDelta | ToolCallStart | ToolCallDelta | StreamEnd


def is_content(event: StreamEvent) -> bool:
    """True for events that carry answer content (the commit point of a stream)."""
    return isinstance(event, TextDelta | ToolCallStart | ToolCallDelta | StreamEnd)
