"""Following a committed stream to its end, and never ending it silently.

After the first content event reached the app, a failover would splice another model's words into a
half-finished answer, so it is off the table. An upstream break then has two honest outcomes:
- resume on the *same* target: ask again with the text streamed so far as an assistant prefill and
  stream only the continuation (Anthropic supports prefill, except with extended thinking on; route
  option `resumeStreams`, default on; not after a tool call began);
- or raise `StreamBroken`, which the endpoint turns into the dialect's error event so the SDK raises
  instead of returning a truncated message as if it were complete.

A stream that brings no new content for the route's `stallTimeout` (30 s) is broken too, even while
bytes flow: keep-alive pings and empty events are not content, so a stream of pings alone ends. When the
request asks for extended thinking or reasoning, the model's thinking (which has no neutral form) may
legitimately fill long stretches between content: its stall limit is the first-token limit instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator

from .errors import RetryableError, StreamBroken, UpstreamError
from .messages import ChatRequest, StreamEvent, StreamStart, TextDelta, ToolCallDelta, ToolCallStart, is_content
from .providers.base import StreamFrame
from .strategies import Answer, AttemptRecord, Call, Engine, LiveStream, asks_for_reasoning

MAX_RESUMES = 2


async def follow(answer: Answer, call: Call, engine: Engine) -> AsyncGenerator[tuple[StreamFrame, bool], None]:
    """Yield (frame, resumed) until the upstream's proper end; `resumed` frames come from a
    continuation and must be re-encoded rather than relayed (their framing restarts upstream).

    Close it (`contextlib.aclosing`) when done: however the consumer stops (client gone, write
    deadline, cancellation), the upstream stream being read is closed then, not at garbage collection,
    so the provider stops generating tokens nobody reads.

    A resume is a new upstream request: it spends a token of the provider's retry budget like any
    retry, and a break the budget cannot pay for ends the stream with an error instead. It is an
    attempt like the others (span, metric, `attempts`), within the client's own deadline."""
    live = answer.stream
    assert live is not None
    target = answer.target
    text: list[str] = []
    saw_tool_call = False
    resumed = False
    pending_space = ""
    frames: AsyncGenerator[StreamFrame, None] = _replay(live)
    resumes = 0
    spec = call.route.spec
    stall = spec.stall_timeout
    if asks_for_reasoning(live.request):
        stall = max(stall, spec.first_token_limit(True))
    clock = asyncio.get_running_loop().time
    try:
        while True:
            try:
                last_content = clock()
                while True:
                    try:
                        async with asyncio.timeout_at(last_content + stall):
                            frame = await anext(frames)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise RetryableError(
                            f"no new content for {stall:g}s (stall limit)", condition="timeout"
                        ) from None
                    if resumed:
                        frame, pending_space = _continuation(frame, pending_space)
                    for event in frame.events:
                        if isinstance(event, TextDelta):
                            text.append(event.text)
                        elif isinstance(event, ToolCallStart | ToolCallDelta):
                            saw_tool_call = True
                        if is_content(event):
                            last_content = clock()
                    yield frame, resumed
            except UpstreamError as exc:
                target.health.record_failure(0.0)
                call.attempts.append(AttemptRecord(target.name, "broken", 0, exc.label))
                can_resume = (
                    call.route.spec.resume_streams
                    and target.adapter.supports_prefill
                    and not saw_tool_call
                    and not _thinks(live.request)
                )
                if not can_resume or resumes >= MAX_RESUMES or not target.budget.try_withdraw():
                    raise StreamBroken(
                        f"upstream stream broke: {exc.message}", exc.error_type, exc.condition
                    ) from None
                resumes += 1
                so_far = "".join(text)
                pending_space = so_far[len(so_far.rstrip()) :]  # the adapter trims it from the prefill
                request = dataclasses.replace(live.request, prefill=so_far or None)
                try:
                    continuation = await engine.resume(call, target, request, resumes)
                except UpstreamError as again:
                    raise StreamBroken(
                        f"upstream stream broke and could not resume: {again.message}", condition=exc.condition
                    ) from None
                resumed = True
                await _close(frames, live)
                live = continuation
                frames = _replay(continuation)
    finally:
        await _close(frames, live)


def _thinks(request: ChatRequest) -> bool:
    """Extended thinking is on: Anthropic refuses an assistant prefill then, so a resume could only fail."""
    bodies = [request.extra, request.native.body if request.native is not None else {}]
    for body in bodies:
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type", "disabled") != "disabled":
            return True
    return False


async def _close(frames: AsyncGenerator[StreamFrame, None], live: LiveStream) -> None:
    """Close the replay and the upstream stream under it (its adapter closes the connection)."""
    for closable in (frames, live.rest):
        aclose = getattr(closable, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _replay(live: LiveStream) -> AsyncGenerator[StreamFrame, None]:
    for frame in live.head:
        yield frame
    async for frame in live.rest:
        yield frame


def _continuation(frame: StreamFrame, pending_space: str) -> tuple[StreamFrame, str]:
    """Drop the continuation's own start, and the whitespace already sent before the break."""
    events: list[StreamEvent] = []
    for event in frame.events:
        if isinstance(event, StreamStart):
            continue
        if pending_space and isinstance(event, TextDelta):
            stripped = event.text.lstrip()
            gap = event.text[: len(event.text) - len(stripped)]
            if pending_space.startswith(gap) or gap.startswith(pending_space):
                event = TextDelta(event.text[min(len(gap), len(pending_space)) :])
            pending_space = ""
            if not event.text:
                continue
        events.append(event)
    return StreamFrame(events, frame.sse), pending_space
