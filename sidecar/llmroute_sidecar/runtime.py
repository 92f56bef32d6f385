"""A policy made ready to serve: compiled once per load, shared by every request until the next one.

`Upstreams` is the long-lived part (client sessions, retry budgets, target health, status pages): it
survives policy reloads so a reload neither drops connections nor forgets that a provider is down.
`Runtime` is one policy snapshot built against it; a request keeps the snapshot it started with
(HOSTILE.md E3), so a reload never changes a request in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from .budgets import RetryBudget
from .checks import AnswerCheck
from .health import TargetHealth
from .keys import KeySource
from .messages import ChatRequest, Message, Text
from .policy import LoadedPolicy, PolicyError, Provider, Route, Target, key_env_var
from .prompts import PromptTemplate, compile_template
from .providers import adapter_for
from .providers.base import Adapter
from .ratelimits import ProviderLimits, RateLimitBook
from .scrubbing import Keyring
from .statusboard import StatusBoard
from .statuspages import DEFAULT_MIN_INTERVAL
from .telemetry import target_span_attributes

_NEUTRAL_PARAMS = {"max_tokens", "temperature", "top_p", "stop", "stop_sequences"}


@dataclass(slots=True)
class CompiledTarget:
    """A target with everything a request needs, resolved."""

    spec: Target
    route: str
    index: int
    provider: Provider
    adapter: Adapter
    template: PromptTemplate
    check: AnswerCheck | None
    health: TargetHealth
    budget: RetryBudget
    params: dict[str, Any]
    extra: dict[str, Any]
    span_attributes: dict[str, Any]
    """What every attempt span of this target carries (telemetry.target_span_attributes)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def model_for(self, requested: str | None) -> str:
        return self.spec.model or requested or ""

    def apply_params(self, request: ChatRequest) -> ChatRequest:
        """The target's `params` win over the app's (the policy is the authority for its targets)."""
        params = self.params
        if "max_tokens" in params:
            request.max_tokens = int(params["max_tokens"])
        if "temperature" in params:
            request.temperature = float(params["temperature"])
        if "top_p" in params:
            request.top_p = float(params["top_p"])
        stop = params.get("stop", params.get("stop_sequences"))
        if stop is not None:
            request.stop = [stop] if isinstance(stop, str) else list(stop)
        if self.extra:
            request.extra = {**request.extra, **self.extra}
        return request

    def route_request(self, variables: dict[str, Any]) -> ChatRequest:
        """The route API: this target's own prompt, rendered with the request's variables."""
        prompt = self.spec.prompt
        request = ChatRequest(
            messages=[Message("user", [Text(self.template.render(variables))])],
            system=prompt.system if prompt else None,
        )
        return self.apply_params(request)


@dataclass(slots=True)
class CompiledRoute:
    spec: Route
    targets: list[CompiledTarget]
    quorum_targets: list[CompiledTarget]
    record_content: bool = False
    """The policy's `telemetry.recordContent`: prompts and completions in the request log and span."""

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(slots=True)
class Runtime:
    """One loaded policy, compiled."""

    policy: LoadedPolicy
    routes: dict[str, CompiledRoute]
    warnings: list[str] = field(default_factory=list)

    def route(self, name: str | None) -> CompiledRoute | None:
        if name is None:
            return None
        return self.routes.get(name)

    @property
    def default_route(self) -> CompiledRoute | None:
        return self.route(self.policy.spec.default_route)


class Upstreams:
    """Long-lived upstream state shared by all policy snapshots."""

    def __init__(self, status_relay: str | None = None, status_min_interval: float | None = None) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._health: dict[tuple[str, str], TargetHealth] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self.keyring = Keyring()
        """Every provider key held, scrubbed from whatever an upstream says (scrubbing.py)."""
        self.rate_limits = RateLimitBook()
        self._status_session = self._new_session()
        self.status = StatusBoard(
            self._status_session,
            relay_url=status_relay,
            min_interval=DEFAULT_MIN_INTERVAL if status_min_interval is None else status_min_interval,
        )

    @staticmethod
    def _new_session() -> aiohttp.ClientSession:
        # No total timeout: it would cut long streams (PROVIDERS.md 3, HOSTILE.md U15). Attempts set
        # their own first-byte and idle deadlines.
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=1024, ttl_dns_cache=300, enable_cleanup_closed=True),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            skip_auto_headers=("User-Agent",),
        )

    def session(self, base_url: str) -> aiohttp.ClientSession:
        """One pooled session per upstream base URL, for the life of the sidecar."""
        session = self._sessions.get(base_url)
        if session is None:
            session = self._sessions[base_url] = self._new_session()
        return session

    def compile(self, policy: LoadedPolicy) -> Runtime:
        """Build a runtime for `policy`; raises PolicyError for what only compiling can find."""
        spec = policy.spec
        problems: list[str] = []
        warnings = list(policy.warnings)
        adapters: dict[str, Adapter] = {}
        keys: list[KeySource] = []
        for provider in spec.providers:
            key = _api_key(provider)
            keys.append(key)
            if key.current() is None and provider.api_key is not None:
                warnings.append(f"spec.providers[{provider.name}].apiKey: the key is not set (environment or file)")
            adapters[provider.name] = adapter_for(
                provider, self.session(provider.effective_base_url), key, self.keyring
            )
            adapters[provider.name].rate_limits = ProviderLimits(self.rate_limits, provider, key)
            budget = self._budgets.get(provider.name)
            if budget is None or budget.spec != spec.retry_budget:
                self._budgets[provider.name] = RetryBudget(spec.retry_budget)
        breaker = spec.circuit_breaker
        routes: dict[str, CompiledRoute] = {}
        for r_index, route in enumerate(spec.routes):
            targets: list[CompiledTarget] = []
            for t_index, target in enumerate(route.targets):
                path = f"spec.routes[{r_index}].targets[{t_index}]"
                try:
                    template = compile_template(target.prompt.template if target.prompt else None)
                    check = AnswerCheck(target.validate_) if target.validate_ else None
                except ValueError as exc:
                    problems.append(f"{path}: {exc}")
                    continue
                open_after = breaker.open_after if breaker.open_after is not None else route.budget
                health = self._health.get((route.name, target.name))
                if health is None:
                    health = TargetHealth(open_after, breaker.min_failures, breaker.probe_interval)
                    self._health[(route.name, target.name)] = health
                else:
                    health.configure(open_after, breaker.min_failures, breaker.probe_interval)
                targets.append(
                    CompiledTarget(
                        spec=target,
                        route=route.name,
                        index=t_index,
                        provider=spec.provider(target.provider),
                        adapter=adapters[target.provider],
                        template=template,
                        check=check,
                        health=health,
                        budget=self._budgets[target.provider],
                        params={k: v for k, v in target.params.items() if k in _NEUTRAL_PARAMS},
                        extra={k: v for k, v in target.params.items() if k not in _NEUTRAL_PARAMS},
                        span_attributes=target_span_attributes(
                            route.name, target.name, spec.provider(target.provider), bool(target.degraded)
                        ),
                    )
                )
            by_name = {t.name: t for t in targets}
            quorum = route.quorum
            quorum_targets = (
                [by_name[n] for n in quorum.targets if n in by_name] if quorum and quorum.targets else targets
            )
            routes[route.name] = CompiledRoute(route, targets, quorum_targets, spec.telemetry.record_content)
        if problems:
            raise PolicyError(problems)
        self.keyring.track(keys)
        self.status.configure(spec.providers)
        return Runtime(policy, routes, warnings)

    def budgets(self) -> dict[str, RetryBudget]:
        return dict(self._budgets)

    def healths(self) -> dict[tuple[str, str], TargetHealth]:
        return dict(self._health)

    async def close(self) -> None:
        await self.status.close()
        for session in self._sessions.values():
            await session.close()
        await self._status_session.close()


def _api_key(provider: Provider) -> KeySource:
    """Where the key is: `apiKey.file` and/or `apiKey.env`, or in a cluster what the webhook sets."""
    if provider.api_key is None:
        return KeySource.fixed(None)
    key = provider.api_key
    if key.env is None and key.file is None:
        return KeySource(env=key_env_var(provider.name))
    return KeySource(env=key.env, file=key.file)
