"""Strategies: which targets a request tries, in what order, and when it gives up.

    retryAndShed (default)  retry the primary with full-jitter backoff until the route's `budget` or
                            its `maxAttempts`, then shed to the fallbacks in order, each with its own
                            prompt and model.
    failover                hot-cold: one attempt on the primary, then the fallbacks.
    hotHot                  spread requests by recent health (opt-in: outputs vary between targets).
    quorum                  every request calls several targets in parallel (see `quorum` below).

Any strategy may also run a `quorum` block for a sampled share of requests (parallel calls; `pick:
first|best`) or hedge (`hedgeAfter`: start the next target only when the first is slow to first byte).

Rules every strategy keeps:
- a client error from the primary goes back to the app; nothing else is tried, unless the route's
  `fallbackOn` names its class (`context-window` by default: a larger model may take the prompt as it is);
- shedding skips the primary without spending anything on it: status page in outage, open circuit;
  one probe per `probeInterval` still tests a provider its status page sheds (evidence beats the page);
- no target gets more than `maxAttempts` upstream calls in one request; the last target that can take
  the request is retried (a 429 without `retry-after` included) within the deadline;
- retries spend the provider's retry budget; SDK retries get no retries of ours ("don't retry retries");
- no sleep runs past the budget; no retry starts after the route's deadline (each fallback still gets
  its first attempt); no attempt at all starts after the client's own deadline (its timeout hint);
- a stream commits at its first content event; everything before that can still fail over, and an
  attempt with no content within `firstTokenTimeout` fails like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import INVALID_SPAN, Span

from .errors import ClientError, FailoverError, LLMRouteError, RateLimited, RetryableError, UpstreamError
from .messages import ChatRequest, ChatResponse, is_content
from .providers.base import AttemptTimeouts, StreamFrame
from .ratelimits import SHED_REASON, estimate_input_tokens
from .runtime import CompiledRoute, CompiledTarget
from .telemetry import Telemetry

ShedReason = str
"""status-page | budget-exhausted | retry-budget | circuit-open | primary-error | context-window |
content-policy | quorum | hedge"""


class StatusView(Protocol):
    """What the engine asks of the status board (statusboard.py): shed shares, and probes of shed providers."""

    def shed_share(self, provider_name: str) -> tuple[float, str | None]: ...

    def probe(self, provider_name: str, interval: float) -> bool: ...

    def probe_result(self, provider_name: str, ok: bool) -> None: ...


@dataclass(slots=True)
class AttemptRecord:
    """One line of the answer's `attempts`: what happened on which target, and how long it took."""

    target: str
    status: str  # ok | error | invalid | skipped | cancelled | broken (a committed stream cut mid-way)
    ms: int
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"target": self.target, "status": self.status, "ms": self.ms}
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass(slots=True)
class LiveStream:
    """A committed stream: the frames read up to the first content, and the rest still upstream."""

    head: list[StreamFrame]
    rest: AsyncIterator[StreamFrame]
    request: ChatRequest
    model: str


@dataclass(slots=True)
class Answer:
    target: CompiledTarget
    response: ChatResponse | None = None
    stream: LiveStream | None = None

    @property
    def degraded(self) -> bool:
        return self.target.spec.degraded


@dataclass(slots=True)
class Call:
    """One request on its way through a route."""

    route: CompiledRoute
    build: Callable[[CompiledTarget], ChatRequest]
    """The request as a given target must receive it (its prompt, its params)."""
    requested_model: str | None
    stream: bool
    budget_deadline: float
    deadline: float
    hard_deadline: float
    """The client's own timeout (minus a margin): no attempt may outlive it."""
    sdk_retry: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    attempts: list[AttemptRecord] = field(default_factory=list)
    shed_reason: ShedReason | None = None
    retry_wait: float = 0.0
    primary_error: UpstreamError | None = None
    last_error: UpstreamError | None = None
    span: Span = INVALID_SPAN
    """The request's server span: the parent of every attempt span."""
    streamed: list[str] | None = None
    """The text streamed to the app, kept only when the route records content."""
    page_probes: set[str] = field(default_factory=set)
    """Targets this call tries as the probe of a provider its status page sheds."""
    too_small: int | None = None
    """After a context-window error: the window (tokens; 0 if undeclared) that was too small."""


class GaveUp(LLMRouteError):
    """No target produced an answer; `error` is the most informative upstream error (HOSTILE U18)."""

    def __init__(self, error: UpstreamError | None, shed_reason: ShedReason | None) -> None:
        super().__init__(error.message if error else "no target could answer")
        self.error = error
        self.shed_reason = shed_reason


STREAM_IDLE_TIMEOUT = 90.0
"""Longest upstream silence between two reads of a stream (HOSTILE U4/U5: pings normally arrive every few
seconds; stalls of 50-70 s that recover are reported, so not less than that in production)."""


class Engine:
    """Runs calls with the strategies of their route.

    `status`: the status board (shed shares, probes of shed providers). `idle_timeout`: the longest
    upstream silence between two reads of a stream (and, for a plain call, while its body arrives after
    the headers); never longer than the client's own deadline."""

    def __init__(
        self,
        telemetry: Telemetry,
        status: StatusView,
        idle_timeout: float = STREAM_IDLE_TIMEOUT,
    ) -> None:
        self.telemetry = telemetry
        self.status = status
        self._shed_share = status.shed_share
        self.idle_timeout = idle_timeout

    async def run(self, call: Call) -> Answer:
        route = call.route.spec
        quorum = route.quorum
        if quorum is not None and (route.strategy == "quorum" or _selected(quorum, call.headers)):
            if quorum.hedge_after is not None:
                return await self._hedge(call, quorum.hedge_after)
            return await self._quorum(call)
        if route.strategy == "hotHot":
            return await self._ordered(call, self._by_health(call.route.targets), retry_primary=False)
        return await self._ordered(
            call, call.route.targets, retry_primary=route.strategy == "retryAndShed"
        )

    # ----- ordered strategies: retryAndShed, failover, hotHot -----------------------------------------
    async def _ordered(self, call: Call, targets: list[CompiledTarget], retry_primary: bool) -> Answer:
        primary, fallbacks = targets[0], targets[1:]
        reason = self._skip_reason(call, primary)
        if reason is not None and fallbacks and _can_serve(call, fallbacks):
            call.shed_reason = reason
            call.attempts.append(AttemptRecord(primary.name, "skipped", 0, reason))
        else:
            if not call.sdk_retry:
                primary.budget.deposit()
            retries = retry_primary and not call.sdk_retry
            last = all(self._blocked(t) for t in fallbacks)
            answer = await self._try_target(call, primary, call.budget_deadline, retries, primary=True, last=last)
            if answer is not None:
                return answer
            call.shed_reason = call.shed_reason or "primary-error"
        for position, target in enumerate(fallbacks):
            if not _fits(target, call.too_small):
                call.attempts.append(AttemptRecord(target.name, "skipped", 0, "context-window"))
                continue
            reason = self._skip_reason(call, target)
            if reason is not None and target is not fallbacks[-1]:
                call.attempts.append(AttemptRecord(target.name, "skipped", 0, reason))
                continue
            retries = call.route.spec.fallback_retries > 0 and not call.sdk_retry
            last = all(self._blocked(t) or not _fits(t, call.too_small) for t in fallbacks[position + 1 :])
            answer = await self._try_target(call, target, call.deadline, retries, primary=False, last=last)
            if answer is not None:
                return answer
        raise GaveUp(call.primary_error or call.last_error, call.shed_reason)

    def _skip_reason(self, call: Call, target: CompiledTarget) -> ShedReason | None:
        """Shed before spending anything: a confirmed status-page outage, or an open circuit.

        Status pages lag real incidents by minutes both ways, so a provider the page sheds entirely still
        gets one probe per `probeInterval` (across every request: `StatusBoard.probe`); enough successful
        probes end the shedding before the page recovers."""
        provider = target.provider.name
        share, _state = self._shed_share(provider)
        if share > 0 and (share >= 1 or random.random() < share):
            if share >= 1 and self.status.probe(provider, target.health.probe_interval):
                call.page_probes.add(target.name)
                return None
            return "status-page"
        if not target.health.allow():
            return "circuit-open"
        return None

    def _blocked(self, target: CompiledTarget) -> bool:
        """Would a request skip this target now (without drawing a probe or a partial-shed share)?"""
        return target.health.state == "open" or self._shed_share(target.provider.name)[0] >= 1

    async def _try_target(
        self, call: Call, target: CompiledTarget, until: float, retries: bool, primary: bool, last: bool = False
    ) -> Answer | None:
        """Attempts on one target; None when the caller should move on to the next target.

        Between attempts it backs off (full jitter, `retry-after` honoured within `until`). A retry is
        skipped without a call or a budget token when another request failed on the target after my last
        attempt (coalescing, see health.py); retrying stops once the target's circuit opens or its status
        page confirms an outage, and when the provider's retry budget cannot pay for another attempt.

        At most `maxAttempts` upstream calls; a fallback gets `1 + fallbackRetries` of them, unless it is
        the `last` target that can take the request: with nowhere left to go, it gets `maxAttempts`, and
        a 429 without `retry-after` (which otherwise fails over at once) is retried too."""
        spec = call.route.spec
        backoff = spec.backoff
        retry_on = spec.retry_on
        if primary or (last and spec.fallback_retries > 0):
            max_tries = spec.max_attempts
        else:
            max_tries = min(1 + spec.fallback_retries, spec.max_attempts)
        step = 0  # backoff steps taken, coalesced ones included
        tries = 0  # upstream calls made on this target by this request
        last_end = -1.0
        error: UpstreamError | None = None
        while True:
            coalesced = False
            if time.monotonic() >= call.hard_deadline:
                # The client has given up by now: an attempt could only fail (and count against the
                # target's health for nothing).
                call.shed_reason = call.shed_reason or "budget-exhausted"
                return None
            if step > 0:
                if time.monotonic() >= call.deadline:
                    call.shed_reason = call.shed_reason or "budget-exhausted"
                    return None
                if not self._keep_retrying(call, target, primary):
                    return None
                coalesced = target.health.failed_since(last_end)  # someone just failed here: skip
                if not coalesced and not target.budget.try_withdraw():
                    self.telemetry.budget_exhausted(target.provider.name)
                    if primary:
                        call.shed_reason = "retry-budget"
                    return None
            if not coalesced:
                # The provider's own rate-limit headers: wait for a reset within `until`, or shed.
                held = await target.adapter.rate_limits.hold(
                    until, lambda: estimate_input_tokens(call.build(target)), _untried_left(call, target)
                )
                call.retry_wait += held.waited
                if held.shed:
                    call.attempts.append(AttemptRecord(target.name, "skipped", 0, SHED_REASON))
                    if primary:
                        call.shed_reason = SHED_REASON
                    return None
                try:
                    return await self._attempt(call, target, tries)
                except ClientError as exc:
                    if _falls_over(call, exc):
                        # Not this target's to answer (too long for its model; refused by its safety
                        # system, where the policy allows routing around that): the next target, no retry.
                        if primary or call.shed_reason is None:
                            call.shed_reason = exc.fallback_class
                        if exc.fallback_class == "context-window":
                            call.too_small = max(call.too_small or 0, target.spec.context_window or 0)
                        if primary:
                            call.primary_error = exc
                        call.last_error = exc
                        return None
                    if primary:
                        raise  # the app's request is wrong: it goes back as the provider sent it
                    call.last_error = exc  # a fallback refusing its translation: try the next one
                    return None
                except UpstreamError as exc:
                    error = exc
                    if primary:
                        call.primary_error = exc
                    call.last_error = exc
                tries += 1
                last_end = time.monotonic()
                rate_limited_here = last and isinstance(error, RateLimited)
                if not (isinstance(error, RetryableError) or rate_limited_here):
                    return None
                if error.condition not in retry_on or not retries:
                    return None
                if tries >= max_tries:
                    if primary:
                        call.shed_reason = call.shed_reason or "budget-exhausted"
                    return None
            step += 1
            if not self._keep_retrying(call, target, primary):
                return None
            wait = _backoff(backoff.initial, backoff.max, backoff.multiplier, backoff.jitter, step)
            hinted = error.retry_after if error is not None and not coalesced else None
            now = time.monotonic()
            if hinted is not None:
                if now + hinted > until:
                    call.shed_reason = call.shed_reason or "budget-exhausted"
                    return None  # the provider asked for longer than we may wait
                wait = max(wait, hinted)
            if now + wait >= until:
                if primary:
                    call.shed_reason = call.shed_reason or "budget-exhausted"
                return None
            if not target.budget.can_withdraw():  # never wait for a retry the budget cannot pay for
                self.telemetry.budget_exhausted(target.provider.name)
                if primary:
                    call.shed_reason = "retry-budget"
                return None
            news = target.health.news()  # a success or the circuit opening ends the wait early
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await news.wait()
            call.retry_wait += time.monotonic() - now

    def _keep_retrying(self, call: Call, target: CompiledTarget, primary: bool) -> bool:
        """False once retrying the target is pointless: its circuit opened, or its status page confirmed
        an outage while we were backing off (a shed request spends nothing more on it)."""
        if target.health.state == "open":
            reason: ShedReason = "circuit-open"
        elif self._shed_share(target.provider.name)[0] >= 1:
            reason = "status-page"
        else:
            return True
        if primary:
            call.shed_reason = reason
        return False

    async def resume(self, call: Call, target: CompiledTarget, request: ChatRequest, step: int) -> LiveStream:
        """A broken stream's continuation (`streams.follow`): an attempt like any other, with its span,
        metric, `attempts` entry and health record, on the prefilled request."""
        answer = await self._attempt(call, target, step, request)
        assert answer.stream is not None
        return answer.stream

    async def _attempt(
        self, call: Call, target: CompiledTarget, step: int, request: ChatRequest | None = None
    ) -> Answer:
        """One upstream call; records its outcome on the target's health and in `attempts`."""
        started = time.monotonic()
        if request is None:
            request = call.build(target)
        model = target.model_for(call.requested_model)
        left = max(0.001, call.hard_deadline - started)
        timeouts = AttemptTimeouts(
            first_byte=min(call.route.spec.first_byte_timeout(call.stream, request.max_tokens), left),
            idle=min(self.idle_timeout, left),
        )
        first_token = min(call.route.spec.first_token_limit(asks_for_reasoning(request)), left)
        if call.route.spec.attempt_timeout is not None:  # an explicit attempt timeout covers first content too
            first_token = min(first_token, call.route.spec.attempt_timeout)
        with self.telemetry.attempt_span(call.span, target, model, step, call.stream) as span:
            try:
                reason = target.adapter.untranslatable(request)
                if reason is not None:
                    raise FailoverError(
                        f"cannot translate for {target.provider.type}: {reason}", condition="untranslatable"
                    )
                if call.stream:
                    stream = await _open_stream(target, request, model, timeouts, first_token)
                    answer = Answer(target, stream=stream)
                else:
                    response = await target.adapter.complete(request, model, timeouts)
                    problem = target.check.problem(response) if target.check else None
                    if problem is not None:
                        raise FailoverError(
                            f"quality check failed: {problem}", condition="validation", error_type="validation"
                        )
                    answer = Answer(target, response=response)
                    span.response(response)
            except asyncio.CancelledError:
                call.attempts.append(AttemptRecord(target.name, "cancelled", _ms(started)))
                self.telemetry.attempt(call.route.name, target, "cancelled")
                span.fail("cancelled")
                raise
            except UpstreamError as exc:
                elapsed = time.monotonic() - started
                status = "invalid" if exc.error_type == "validation" else "error"
                call.attempts.append(AttemptRecord(target.name, status, _ms(started), exc.label))
                if isinstance(exc, RetryableError):
                    target.health.record_failure(elapsed)
                if target.name in call.page_probes:
                    call.page_probes.discard(target.name)
                    if not isinstance(exc, ClientError):  # a refused request says nothing of health
                        self.status.probe_result(target.provider.name, False)
                self.telemetry.attempt(call.route.name, target, _result(exc))
                span.fail(_error_type(exc))
                raise
        target.health.record_success(time.monotonic() - started)
        if target.name in call.page_probes:
            call.page_probes.discard(target.name)
            self.status.probe_result(target.provider.name, True)
        call.attempts.append(AttemptRecord(target.name, "ok", _ms(started)))
        self.telemetry.attempt(call.route.name, target, "ok")
        return answer

    # ----- hot-hot -------------------------------------------------------------------------------------
    @staticmethod
    def _by_health(targets: list[CompiledTarget]) -> list[CompiledTarget]:
        """Weighted random order by recent success rate and latency; unhealthy targets go last."""
        keyed = [
            (random.random() ** (1.0 / max(t.health.weight(), 1e-6)), t)
            for t in targets
            if t.health.state == "closed"
        ]
        ordered = [t for _, t in sorted(keyed, key=lambda pair: pair[0], reverse=True)]
        return ordered + [t for t in targets if t.health.state != "closed"]

    # ----- quorum and hedging ------------------------------------------------------------------------
    def _parallel_targets(self, call: Call) -> list[CompiledTarget]:
        """The quorum's targets that may be called now (not shed by their status page, circuit closed or
        probing); the skipped ones are listed in `attempts`. With none left, the first one still goes."""
        targets = call.route.quorum_targets
        usable: list[CompiledTarget] = []
        for target in targets:
            reason = self._skip_reason(call, target)
            if reason is None:
                usable.append(target)
            else:
                call.attempts.append(AttemptRecord(target.name, "skipped", 0, reason))
                if target.index == 0:
                    call.shed_reason = reason  # why the primary is not in the race
        return usable or targets[:1]

    def _note_error(self, call: Call, target: CompiledTarget, exc: BaseException | None) -> None:
        if isinstance(exc, UpstreamError):
            call.last_error = exc
            if target.index == 0:
                call.primary_error = exc  # the most informative error if everything fails (U18)

    async def _quorum(self, call: Call) -> Answer:
        """Call the quorum's targets in parallel. `first`: first valid answer wins, losers are cancelled;
        `best`: after the first valid answer, wait up to `grace` and pick by target order."""
        quorum = call.route.spec.quorum
        assert quorum is not None
        targets = self._parallel_targets(call)
        call.shed_reason = call.shed_reason or "quorum"
        tasks = {asyncio.create_task(self._attempt(call, t, 0)): t for t in targets}
        for _ in targets:
            self.telemetry.quorum(call.route.name, "call")
        winners: dict[int, Answer] = {}
        grace_deadline: float | None = None
        pending = set(tasks)
        try:
            while pending:
                timeout = None if grace_deadline is None else max(0.0, grace_deadline - time.monotonic())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # grace is over
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        winners[tasks[task].index] = task.result()
                    elif isinstance(exc, ClientError) and tasks[task].index == 0 and not _falls_over(call, exc):
                        # The app's request is wrong: it goes back as the provider sent it, whatever
                        # another target made of it (CONTRACT §3: no fallback on a client error).
                        await self._discard_all(winners.values())
                        raise exc
                    else:
                        self._note_error(call, tasks[task], exc)
                if not winners:
                    continue
                if quorum.pick == "first":
                    break
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + quorum.grace
                if all(min(winners) < tasks[task].index for task in pending):
                    break  # no answer still running could beat the best one in: no need to wait out grace
        finally:
            await _cancel(pending)
        if not winners:
            raise GaveUp(call.primary_error or call.last_error, call.shed_reason)
        best = winners[min(winners)]
        await self._discard_all(answer for answer in winners.values() if answer is not best)
        self.telemetry.quorum(call.route.name, "win" if best.target.index == 0 else "fallback-win")
        if best.target.index == 0:
            call.shed_reason = None
        return best

    async def _discard_all(self, answers: Iterable[Answer]) -> None:
        """Drop answers that lost. A complete one was paid for: its tokens and cost still count."""
        for answer in answers:
            if answer.response is not None:
                self.telemetry.usage(
                    answer.target.provider.name,
                    answer.response.model,
                    answer.response.usage,
                    self.telemetry.price(answer.response.model, answer.target.spec.model),
                    route=answer.target.route,
                )
            await _discard(answer)

    async def _hedge(self, call: Call, hedge_after: float) -> Answer:
        """Start the primary; if it has not answered (streams: first content) by `hedgeAfter`, start the
        next target too; whichever answers first wins, the other is cancelled. A target that fails starts
        the next one at once."""
        targets = self._parallel_targets(call)
        tasks: dict[asyncio.Task[Answer], CompiledTarget] = {}
        pending: set[asyncio.Task[Answer]] = set()
        try:
            for position, target in enumerate(targets):
                task = asyncio.create_task(self._attempt(call, target, 0))
                tasks[task] = target
                pending.add(task)
                if position:
                    call.shed_reason = "hedge"
                    self.telemetry.quorum(call.route.name, "hedge")
                is_last = position == len(targets) - 1
                while pending:
                    done, pending = await asyncio.wait(
                        pending, timeout=None if is_last else hedge_after, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done:
                        break  # slow: hedge with the next target
                    for finished in done:
                        exc = finished.exception()
                        if exc is None:
                            answer = finished.result()
                            if answer.target.index == 0:
                                call.shed_reason = None
                            elif len(tasks) > 1:
                                self.telemetry.quorum(call.route.name, "hedge-win")
                            return answer
                        if isinstance(exc, ClientError) and tasks[finished].index == 0 and not _falls_over(call, exc):
                            raise exc
                        self._note_error(call, tasks[finished], exc)
                    if not pending:
                        break  # all started attempts failed: start the next target now
            raise GaveUp(call.primary_error or call.last_error, call.shed_reason)
        finally:
            await _cancel(pending)


async def _open_stream(
    target: CompiledTarget, request: ChatRequest, model: str, timeouts: AttemptTimeouts, first_token: float
) -> LiveStream:
    """Open a stream and read it up to its first content event: that is where the answer commits. The
    response headers must come within the attempt timeout, the first content within `first_token`
    (pings and empty events do not count)."""
    frames = target.adapter.stream(request, model, timeouts)
    head: list[StreamFrame] = []
    try:
        async with asyncio.timeout(first_token):
            async for frame in frames:
                head.append(frame)
                if any(is_content(event) for event in frame.events):
                    break
    except TimeoutError:
        await frames.aclose()
        raise RetryableError(
            f"no content within the first-token limit ({first_token:g}s)", condition="timeout"
        ) from None
    except BaseException:
        await frames.aclose()
        raise
    return LiveStream(head, frames, request, model)


def _fits(target: CompiledTarget, too_small: int | None) -> bool:
    """May this target take a prompt that was too long for a `too_small`-token window? Unknown windows
    (undeclared on either side) are tried; a declared one must be larger."""
    window = target.spec.context_window
    return too_small is None or not too_small or window is None or window > too_small


def _falls_over(call: Call, error: ClientError) -> bool:
    """Does the route's `fallbackOn` send this client error to the next target?"""
    return error.fallback_class is not None and error.fallback_class in call.route.spec.fallback_on


def asks_for_reasoning(request: ChatRequest) -> bool:
    """Does the request ask for extended thinking or reasoning (its first token may take minutes)?
    Anthropic `thinking`, OpenAI `reasoning_effort` / `reasoning`, Gemini `thinkingConfig`, whether the
    app sent it or a target's `params` set it."""
    bodies: list[Mapping[str, Any]] = [request.extra]
    if request.native is not None:
        bodies.append(request.native.body)
    for body in bodies:
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type", "disabled") != "disabled":
            return True
        effort = body.get("reasoning_effort")
        if isinstance(effort, str) and effort not in ("none", "minimal"):
            return True
        reasoning = body.get("reasoning")
        if isinstance(reasoning, dict) and reasoning.get("effort", "medium") not in ("none", "minimal"):
            return True
        config = body.get("generationConfig")
        gemini = body.get("thinkingConfig") or (config.get("thinkingConfig") if isinstance(config, dict) else None)
        if isinstance(gemini, dict) and gemini.get("thinkingBudget", -1) != 0:
            return True
    return False


def _can_serve(call: Call, targets: list[CompiledTarget]) -> bool:
    """Whether any of `targets` can take the app's request. When none can (it cannot be translated for
    any fallback), the primary is the last target standing and is tried once even when it would be
    skipped: its own error is what the app should hear, not "cannot translate" (HOSTILE U18)."""
    return any(target.adapter.untranslatable(call.build(target)) is None for target in targets)


def _untried_left(call: Call, target: CompiledTarget) -> bool:
    """Is there a target this call has not tried yet (somewhere a shed request can go)?"""
    tried = {record.target for record in call.attempts}
    return any(t is not target and t.name not in tried for t in call.route.targets)


def _selected(quorum: object, headers: Mapping[str, str]) -> bool:
    from .policy import Quorum

    assert isinstance(quorum, Quorum)
    if quorum.when_header and all(headers.get(k) == v for k, v in quorum.when_header.items()):
        return True
    return quorum.sample > 0 and random.random() < quorum.sample


def _backoff(initial: float, maximum: float, multiplier: float, jitter: str, step: int) -> float:
    ceiling = min(maximum, initial * multiplier ** (step - 1))
    if jitter == "full":
        return random.uniform(0, ceiling)
    if jitter == "equal":
        return ceiling / 2 + random.uniform(0, ceiling / 2)
    return ceiling


def _result(error: UpstreamError) -> str:
    """Low-cardinality attempt result for metrics: the error class."""
    if error.error_type == "validation":
        return "invalid"
    if isinstance(error, ClientError):
        return "client_error"
    if isinstance(error, FailoverError):
        return "unavailable"
    return "timeout" if error.condition == "timeout" else (
        "connection" if error.condition == "connection" else f"http_{error.condition}"
    )


def _error_type(error: UpstreamError) -> str:
    """`error.type` of a failed attempt's span: the HTTP status code as a string when the provider sent
    one (OpenTelemetry semantic conventions), else the low-cardinality class (`timeout`, `connection`…)."""
    if error.status is not None and error.status >= 400 and error.error_type != "validation":
        return str(error.status)
    return _result(error)


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


async def _cancel(tasks: set[asyncio.Task[Answer]]) -> None:
    """Cancel losers and make sure their upstream connections are closed before returning."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            answer = await task
            await _discard(answer)


async def _discard(answer: Answer) -> None:
    if answer.stream is not None:
        with contextlib.suppress(Exception):
            await answer.stream.rest.aclose()  # type: ignore[attr-defined]
