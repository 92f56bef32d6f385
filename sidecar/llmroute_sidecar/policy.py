"""The LLMRoutePolicy model: one parser for the Kubernetes manifest and the sidecar's config file.

The same YAML runs the sidecar standalone and, rendered by the operator into a ConfigMap, in a cluster.
Parsing happens once per load (never per request). Every error names the field path the user wrote
(`spec.routes[0].targets[1].provider: unknown provider "gtp"`); problems that are legal but risky come
back as warnings, which the operator turns into status conditions.

Field names are the contract's camelCase; Python attributes are snake_case (pydantic aliases).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

from . import __version__
from .durations import DURATION_PATTERN, format_duration, parse_duration

log = logging.getLogger(__name__)

API_VERSION = "llmroute.dev/v1alpha1"
KIND = "LLMRoutePolicy"
SANE_BUDGET = (4.0, 12.0)
DEFAULT_ATTEMPT_TIMEOUT = 30.0
THINKING_FIRST_TOKEN_TIMEOUT = 300.0
"""The least a streamed attempt waits for its first content when the request asks for extended thinking
or reasoning: the model thinks (minutes, legitimately) before it writes a word the app can see."""
SLOWEST_TOKENS_PER_SECOND = 25.0
"""A slow but healthy generation rate: a plain (non-streaming) answer's headers only come once all of it
is generated, so an unset `attemptTimeout` grows with `max_tokens` at this rate (HOSTILE.md U3)."""


def _to_seconds(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    return value


Duration = Annotated[
    float,
    BeforeValidator(_to_seconds),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "maxLength": 32}),
    Field(ge=0),
]
"""A Go-style duration string (`250ms`, `8s`, `1m`), held as float seconds."""

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")]
ProviderType = Literal["anthropic", "openai", "gemini"]
Strategy = Literal["retryAndShed", "failover", "hotHot", "quorum"]
RetryCondition = Annotated[int | Literal["timeout", "connection"], Field(union_mode="left_to_right")]
FallbackClass = Literal["context-window", "content-policy"]
"""Client errors a route may send to the next target instead of back to the app (`fallbackOn`)."""
DEFAULT_FALLBACK_ON: tuple[FallbackClass, ...] = ("context-window",)

DEFAULT_RETRY_ON: tuple[int | Literal["timeout", "connection"], ...] = (
    429, 500, 502, 503, 504, 529, "timeout", "connection",
)
DEFAULT_BASE_URLS: dict[str, str] = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com",
}


class Model(BaseModel):
    """Strict camelCase model: unknown fields are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,  # field docstrings become the CRD's descriptions
    )


SecretName = Annotated[
    str,
    Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
]
"""A DNS-1123 subdomain: what the Pod API accepts in `secretKeyRef.name` (an invalid one would make the
injected pod itself invalid, refusing every pod of the Deployment)."""


class SecretKeyRef(Model):
    """A key of a Kubernetes Secret in the policy's namespace."""

    name: SecretName
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class ApiKey(Model):
    """Where the provider's API key comes from; never the key itself."""

    secret_key_ref: SecretKeyRef | None = None
    """In a cluster: the Secret holding the key (the webhook gives it to the sidecar container only)."""
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Standalone (and as rendered by the operator): the environment variable holding the key."""
    file: str | None = Field(default=None, min_length=1, max_length=4096)
    """Standalone (and as rendered by the operator): a file holding the key, re-read when it changes, so
    a rotated Secret reaches the sidecar without a restart. With `env` too, the file wins when readable."""


class StatusPage(Model):
    """A provider's public status page, read to shed traffic before retries are burnt. Fail-open."""

    type: Literal["statuspage", "google-cloud"] = "statuspage"
    """`statuspage`: Atlassian summary.json (also incident.io's compatible one); `google-cloud`: incidents.json."""
    url: str = Field(min_length=1)
    components: list[str] = Field(default_factory=list, max_length=32)
    """Component ids or names to watch (google-cloud: product names); empty: the page indicator."""
    poll_interval: Duration = 30.0
    shed_on: list[str] = Field(default_factory=lambda: ["major_outage"], max_length=16)
    """Statuses that shed all traffic (page indicators: `major`, `critical`)."""
    partial_shed: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict, max_length=16)
    """Statuses that shed a share of traffic, e.g. `{partial_outage: 0.5}`."""
    confirm_after: int = Field(default=2, ge=1, le=20)
    """Consecutive polls showing a shedding state before traffic is shed (hysteresis)."""
    recover_after: int = Field(default=2, ge=1, le=20)
    """Consecutive polls showing recovery before traffic returns."""


class RateLimits(Model):
    """Rate-limit-aware shedding from the provider's own rate-limit headers (Anthropic
    `anthropic-ratelimit-*`, OpenAI `x-ratelimit-*`), read from every answer, per API key."""

    enabled: bool = True
    """Before an attempt, shed to the next target without calling when the provider has nothing left until a
    reset beyond the route's budget, or wait for a reset that comes within it. Off: the headers are still read
    for the metrics and `/status`, and never change routing."""
    min_remaining: int = Field(default=0, ge=0, le=1_000_000_000)
    """A floor: a dimension is treated as exhausted until its reset when the request would leave less than
    this of it (requests: one; tokens: the request's estimated input). 0: only when the request does not fit."""


class Provider(Model):
    """An LLM API account: its type, endpoint, key and optional status page."""

    name: Name
    type: ProviderType
    base_url: str | None = Field(default=None, alias="baseURL", max_length=2048)
    """As the provider's official SDK takes it; default per type. `https://` (the key travels in it), or
    `http://` with `allowPlainHTTP`; standalone, a loopback host (a local fake or proxy) needs no opt-in."""
    allow_plain_http: bool = Field(default=False, alias="allowPlainHTTP")
    """Allow an `http://` baseURL: the API key is then sent unencrypted. In a cluster the host must also
    be on the operator's allowlist of provider hosts."""
    api_key: ApiKey | None = None
    status_page: StatusPage | None = None
    rate_limits: RateLimits = Field(default_factory=RateLimits)

    @property
    def effective_base_url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS[self.type]).rstrip("/")


class Prompt(Model):
    """A prompt maintained for one target's model (prompts are not interchangeable between models)."""

    system: str | None = None
    template: str | None = None
    """Jinja template of the user message; variables come from the request (strict, sandboxed)."""


class Validate(Model):
    """A target's own quality bar: a failed check is a failed attempt, and the next target is tried."""

    json_schema: dict[str, Any] | None = None
    """The answer must be JSON valid against this schema."""
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=1)


class Target(Model):
    """One way of answering a route: a provider, a model and the prompt maintained for it."""

    name: Name
    provider: Name
    model: str | None = None
    """The model sent upstream; unset on compatible endpoints: the app's own model passes through."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Generation parameters: max_tokens, temperature, top_p, stop."""
    prompt: Prompt | None = None
    degraded: bool = False
    """Answers from this target are marked degraded (header, field and notice)."""
    validate_: Validate | None = Field(default=None, alias="validate")
    context_window: int | None = Field(default=None, ge=1)
    """The model's context window in tokens. After a context-window error, the route moves on to a
    target that declares a larger one (targets declaring one no larger are skipped)."""


class Backoff(Model):
    """Exponential backoff between attempts on the same target."""

    initial: Duration = 0.5
    max: Duration = 4.0
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0)
    jitter: Literal["full", "equal", "none"] = "full"


class Quorum(Model):
    """Parallel calls to several targets for a small share of high-value requests.

    `sample` and `whenHeader` select the requests; `hedgeAfter` turns the block into hedging: the next
    target starts only when the previous one has not produced its first byte by then.
    """

    sample: float = Field(default=0.0, ge=0, le=1)
    when_header: dict[str, str] = Field(default_factory=dict, max_length=16)
    targets: list[Name] = Field(default_factory=list, max_length=16)
    """Targets called in parallel (default: all of the route's targets)."""
    pick: Literal["first", "best"] = "first"
    """`first`: first valid answer wins, losers cancelled; `best`: within `grace`, by target order."""
    grace: Duration = 0.5
    hedge_after: Duration | None = None


class Route(Model):
    """One feature of the app: an ordered list of targets (primary first) and how to use them."""

    name: Name
    strategy: Strategy = "retryAndShed"
    budget: Duration = 8.0
    """How long the primary may be retried before shedding to the fallback."""
    deadline: Duration | None = None
    """Overall: no attempt on any target starts after it (default: 2 x budget). Capped by client hints."""
    backoff: Backoff = Field(default_factory=Backoff)
    retry_on: list[RetryCondition] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON), max_length=32)
    attempt_timeout: Duration | None = None
    """Per upstream attempt: until the response headers (streams: the first content event). Unset: 30s,
    and for a non-streaming call at least max_tokens / 25 per second (a long plain answer legitimately
    takes minutes before its first byte)."""
    fallback_retries: int = Field(default=1, ge=0, le=5)
    """Extra attempts each fallback target gets, within what remains of the deadline. The last target
    that can take the request gets up to maxAttempts (nothing is left to fail over to); 0 turns every
    fallback retry off."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Upstream attempts one request may make on one target: the primary's retries stop there (or at the
    budget, whichever comes first), then the request sheds."""
    first_token_timeout: Duration = 15.0
    """A streamed attempt that has produced no content by then fails over like any failed attempt.
    Requests that ask for extended thinking or reasoning wait at least 5m (their first token
    legitimately takes minutes)."""
    stall_timeout: Duration = 30.0
    """A committed stream that brings no new content for this long (pings and empty events do not
    count) resumes where it can, or ends with the dialect's error event."""
    fallback_on: list[FallbackClass] = Field(default_factory=lambda: list(DEFAULT_FALLBACK_ON), max_length=2)
    """Client errors that move to the next target instead of going back to the app: `context-window`
    (the prompt is too long for the model; default) and `content-policy` (a safety system refused the
    request or the answer; never a default: routing around it is a product decision)."""
    targets: list[Target] = Field(min_length=1, max_length=16)
    degraded_notice: str | None = None
    quorum: Quorum | None = None
    resume_streams: bool = True
    acknowledge_output_variance: bool = False

    @property
    def overall_deadline(self) -> float:
        return self.deadline if self.deadline is not None else 2 * self.budget

    def first_byte_timeout(self, stream: bool = True, max_tokens: int | None = None) -> float:
        """How long one attempt may wait for its response headers (streams: the first content)."""
        if self.attempt_timeout is not None:
            return self.attempt_timeout
        if stream or not max_tokens:
            return DEFAULT_ATTEMPT_TIMEOUT
        return max(DEFAULT_ATTEMPT_TIMEOUT, max_tokens / SLOWEST_TOKENS_PER_SECOND)

    def first_token_limit(self, reasoning: bool) -> float:
        """How long a streamed attempt may go without content before it fails over."""
        return max(self.first_token_timeout, THINKING_FIRST_TOKEN_TIMEOUT) if reasoning else self.first_token_timeout


class RetryBudget(Model):
    """Per provider, Linkerd-style: retries may add `ratio` to the load, plus `minPerSecond`."""

    ratio: float = Field(default=0.2, ge=0, le=10)
    min_per_second: float = Field(default=10.0, ge=0)
    window: Duration = 10.0


class CircuitBreaker(Model):
    """Per target: failing with no success for longer than `openAfter` is an outage, not a microspike."""

    open_after: Duration | None = None
    """Default: the route's budget."""
    min_failures: int = Field(default=3, ge=1)
    probe_interval: Duration = 1.0


class Price(Model):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class Telemetry(Model):
    """What the sidecar may record about requests."""

    record_content: bool = False
    """Opt in to prompts and completions in logs and spans (off: never)."""


class PolicySpec(Model):
    """The spec of an LLMRoutePolicy."""

    providers: list[Provider] = Field(min_length=1, max_length=32)
    default_route: Name | None = None
    routes: list[Route] = Field(min_length=1, max_length=128)
    retry_budget: RetryBudget = Field(default_factory=RetryBudget)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    pricing: dict[str, Price] = Field(default_factory=dict, max_length=256)
    telemetry: Telemetry = Field(default_factory=Telemetry)

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)


class PolicyError(ValueError):
    """A policy that cannot be used; `problems` are `path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with its identity: what a sidecar runs and the operator reports."""

    name: str
    namespace: str | None
    generation: int | None
    spec: PolicySpec
    config_hash: str
    warnings: list[str] = field(default_factory=list)

    def to_document(self) -> dict[str, Any]:
        """The manifest form, with defaults filled in (what the operator writes as policy.json)."""
        metadata: dict[str, Any] = {"name": self.name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        if self.generation is not None:
            metadata["generation"] = self.generation
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": metadata,
            "spec": dump_spec(self.spec),
        }


def key_env_var(provider_name: str) -> str:
    """The sidecar environment variable that carries a provider's key in a cluster."""
    return "LLMROUTE_KEY_" + re.sub(r"[^A-Z0-9]", "_", provider_name.upper())


KEY_MOUNT_DIR = "/var/run/llmroute/keys"
"""Where the webhook mounts the provider keys for the sidecar (one file per provider)."""


def key_file(provider_name: str) -> str:
    """The file that carries a provider's key in a cluster (a projected Secret volume, kept current)."""
    return f"{KEY_MOUNT_DIR}/{provider_name}"


RENDERED_ANNOTATION = "llmroute.dev/rendered-by"
"""On a config the operator wrote: machine-written, possibly by a newer operator than the sidecar reading
it, so fields the sidecar does not know are ignored with a warning instead of refused (version skew)."""


def render_sidecar_config(policy: LoadedPolicy) -> dict[str, Any]:
    """The config file the operator writes for sidecars: Secret references become a file and an env var.

    The webhook gives the sidecar container the key both ways from the Secret: as a file of a projected
    volume (which the kubelet updates when the Secret rotates) and as a `secretKeyRef` variable (fixed at
    start). The rendered config holds no secret material and no Secret names.

    Only fields whose value differs from the default are written (the API server fills the CRD's defaults
    in, so "what the user set" is not known here): a field a newer operator adds with a default never
    reaches the file, and the previous release's sidecars, which refuse fields they do not know, keep
    loading it. Each sidecar applies its own defaults; the configHash is of the effective spec.
    """
    document = policy.to_document()
    document["spec"] = policy.spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
    document["metadata"]["annotations"] = {RENDERED_ANNOTATION: f"llmroute-operator {__version__}"}
    for provider in document["spec"]["providers"]:
        key = provider.get("apiKey")
        if key and "secretKeyRef" in key:
            provider["apiKey"] = {"env": key_env_var(provider["name"]), "file": key_file(provider["name"])}
    return document


def dump_spec(spec: PolicySpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def config_hash(spec: PolicySpec) -> str:
    """A short, stable digest of the effective spec (same policy -> same hash, whatever the spelling)."""
    canonical = orjson.dumps(dump_spec(spec), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


LOOPBACK_HOSTS = ("localhost", "::1")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable only from inside this host (or pod)."""
    return host.lower() in LOOPBACK_HOSTS or re.fullmatch(r"127(\.\d{1,3}){3}", host) is not None


def base_url_problems(provider: Provider, path: str) -> list[str]:
    """Why `provider.baseURL` may not carry an API key: a scheme other than https (plain http needs
    `allowPlainHTTP`, except to a loopback host), no host, or credentials in the URL."""
    if provider.base_url is None:
        return []
    try:
        parts = urlsplit(provider.base_url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        return [f"{path}.baseURL: not a valid URL: {exc}"]
    if parts.scheme not in ("https", "http") or not host:
        return [f"{path}.baseURL: expected https://<host>[/path], got {provider.base_url!r}"]
    if parts.username is not None or parts.password is not None:
        return [f"{path}.baseURL: must not carry credentials (the key comes from apiKey)"]
    if parts.scheme == "http" and not provider.allow_plain_http and not is_loopback(host):
        return [
            f"{path}.baseURL: plain http would send the API key unencrypted to {host}; use https, or set "
            "allowPlainHTTP: true on the provider"
        ]
    return []


def _format_loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("int", "literal['timeout','connection']", "function-before[_to_seconds(), float]"):
            continue  # union-branch names pydantic puts in locations; not part of the user's path
        else:
            path += f".{part}" if path else str(part)
    return path


def _semantic_problems(spec: PolicySpec) -> tuple[list[str], list[str]]:
    """Cross-field checks pydantic cannot express field by field: (errors, warnings)."""
    errors: list[str] = []
    warnings: list[str] = []

    def unique(items: list[str], path: str, what: str) -> None:
        seen: set[str] = set()
        for index, item in enumerate(items):
            if item in seen:
                errors.append(f'{path}[{index}].name: duplicate {what} name "{item}"')
            seen.add(item)

    providers = {p.name: p for p in spec.providers}
    unique([p.name for p in spec.providers], "spec.providers", "provider")
    unique([r.name for r in spec.routes], "spec.routes", "route")
    for p_index, provider in enumerate(spec.providers):
        errors.extend(base_url_problems(provider, f"spec.providers[{p_index}]"))
        key = provider.api_key
        if key is not None and (key.env is None and key.file is None) == (key.secret_key_ref is None):
            errors.append(f"spec.providers[{p_index}].apiKey: set secretKeyRef, or env and/or file")
    variables: dict[str, str] = {}
    for p_index, provider in enumerate(spec.providers):
        variable = key_env_var(provider.name)
        if variable in variables and variables[variable] != provider.name:
            errors.append(
                f'spec.providers[{p_index}].name: "{provider.name}" and "{variables[variable]}" would share '
                f"the key variable {variable}; rename one"
            )
        variables.setdefault(variable, provider.name)
    if spec.default_route is not None and spec.route(spec.default_route) is None:
        errors.append(f'spec.defaultRoute: unknown route "{spec.default_route}"')
    for r_index, route in enumerate(spec.routes):
        path = f"spec.routes[{r_index}]"
        unique([t.name for t in route.targets], f"{path}.targets", "target")
        for t_index, target in enumerate(route.targets):
            if target.provider not in providers:
                errors.append(f'{path}.targets[{t_index}].provider: unknown provider "{target.provider}"')
            check = target.validate_
            if check and check.min_chars and check.max_chars and check.min_chars > check.max_chars:
                errors.append(f"{path}.targets[{t_index}].validate: minChars is larger than maxChars")
        if route.budget <= 0:
            errors.append(f"{path}.budget: must be greater than 0")
        elif not SANE_BUDGET[0] <= route.budget <= SANE_BUDGET[1]:
            warnings.append(
                f"{path}.budget: {format_duration(route.budget)} is outside the sane range 4s..12s"
            )
        if route.deadline is not None and route.deadline < route.budget:
            errors.append(f"{path}.deadline: must not be shorter than the budget")
        if route.backoff.initial > route.backoff.max:
            errors.append(f"{path}.backoff.initial: larger than backoff.max")
        if route.strategy == "hotHot":
            if not route.acknowledge_output_variance:
                errors.append(
                    f"{path}.strategy: hotHot spreads traffic across models whose prompts and outputs "
                    "differ; set acknowledgeOutputVariance: true to accept that"
                )
            else:
                warnings.append(f"{path}.strategy: hotHot routing; outputs will vary between targets")
        if route.strategy in ("failover", "retryAndShed") and len(route.targets) == 1:
            warnings.append(f"{path}.targets: a single target has nothing to shed to")
        if route.quorum is not None:
            names = {t.name for t in route.targets}
            for q_index, name in enumerate(route.quorum.targets):
                if name not in names:
                    errors.append(f'{path}.quorum.targets[{q_index}]: unknown target "{name}"')
    return errors, warnings


def _without_invalid_fields(raw_spec: Any, error: ValidationError, passes: int = 4) -> PolicySpec | None:
    """The spec with every field pydantic refused left out (defaults in their place), so the cross-field
    checks can still report their problems in the same run (`llmroute validate` lists every mistake it
    can find, not the first). None when leaving fields out cannot make it valid (a required field)."""
    spec = copy.deepcopy(raw_spec)
    for _ in range(passes):
        for problem in error.errors():
            if problem["type"] == "missing" or not _drop(spec, tuple(problem["loc"])):
                return None
        try:
            return PolicySpec.model_validate(spec)
        except ValidationError as again:
            error = again
    return None


def _drop(document: Any, loc: tuple[int | str, ...]) -> bool:
    """Remove the mapping key at `loc` (list items stay: removing one would renumber the paths)."""
    parent = document
    path = [part for part in loc if not (isinstance(part, str) and ("[" in part or "(" in part))]
    for part in path[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(parent, dict) and path and path[-1] in parent:
        del parent[path[-1]]
        return True
    return False


def _without(data: Any, locations: list[tuple[int | str, ...]]) -> Any:
    """A copy of `data` without the fields at `locations` (pydantic error locations)."""
    data = copy.deepcopy(data)
    for location in locations:
        parent = data
        for part in location[:-1]:
            parent = parent[part]
        if isinstance(parent, dict):
            parent.pop(location[-1], None)
    return data


def load_policy(document: Mapping[str, Any], *, tolerate_unknown: bool | None = None) -> LoadedPolicy:
    """Validate a manifest (`apiVersion/kind/metadata/spec`) or a bare spec; raise PolicyError.

    Unknown fields are errors (a typo must not silently do nothing), except in a config the operator
    rendered (`RENDERED_ANNOTATION`; or `tolerate_unknown=True`): those are ignored, each with a warning,
    so a sidecar keeps running what a newer operator wrote."""
    if not isinstance(document, Mapping):
        raise PolicyError(["policy: expected a mapping (an LLMRoutePolicy manifest)"])
    if "spec" in document:
        prefix = "spec"
        raw_spec = document["spec"]
        metadata = document.get("metadata") or {}
        problems = []
        if document.get("apiVersion") not in (None, API_VERSION):
            problems.append(f'apiVersion: expected "{API_VERSION}", got "{document.get("apiVersion")}"')
        if document.get("kind") not in (None, KIND):
            problems.append(f'kind: expected "{KIND}", got "{document.get("kind")}"')
        if problems:
            raise PolicyError(problems)
    else:
        prefix, raw_spec, metadata = "spec", document, {}
    if not isinstance(metadata, Mapping):
        raise PolicyError(["metadata: expected a mapping"])
    if tolerate_unknown is None:
        tolerate_unknown = RENDERED_ANNOTATION in (metadata.get("annotations") or {})
    ignored: list[str] = []
    try:
        spec = PolicySpec.model_validate(raw_spec)
    except ValidationError as exc:
        unknown = [tuple(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not (tolerate_unknown and unknown):
            problems = [f"{_format_loc(prefix, tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
            rest = _without_invalid_fields(raw_spec, exc)
            if rest is not None:
                problems += [p for p in _semantic_problems(rest)[0] if p not in problems]
            raise PolicyError(problems) from None
        ignored = [f"{_format_loc(prefix, loc)}: unknown field ignored (a newer operator's?)" for loc in unknown]
        for line in ignored:
            log.warning("%s", line)
        try:
            spec = PolicySpec.model_validate(_without(raw_spec, unknown))
        except ValidationError as again:
            raise PolicyError(
                [f"{_format_loc(prefix, tuple(e['loc']))}: {e['msg']}" for e in again.errors()]
            ) from None
    errors, warnings = _semantic_problems(spec)
    warnings = ignored + warnings
    if errors:
        raise PolicyError(errors)
    generation = metadata.get("generation")
    return LoadedPolicy(
        name=str(metadata.get("name") or "standalone"),
        namespace=metadata.get("namespace"),
        generation=generation if isinstance(generation, int) else None,
        spec=spec,
        config_hash=config_hash(spec),
        warnings=warnings,
    )


def parse_policy_text(text: str | bytes) -> LoadedPolicy:
    """Parse YAML or JSON text (a policy file) into a validated policy."""
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([f"policy: not valid YAML/JSON: {exc}"]) from None
    if document is None:
        raise PolicyError(["policy: the file is empty"])
    return load_policy(document)
