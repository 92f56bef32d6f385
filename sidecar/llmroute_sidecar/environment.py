"""The sidecar's `LLMROUTE_*` environment, read and checked once, before anything starts.

A value the sidecar cannot use is a one-line `EnvironmentProblem` naming the variable and what it
accepts (the CLI prints it and exits 2), never a traceback at start and never a silent default:

    LLMROUTE_LISTEN               host:port to listen on (default 127.0.0.1:8787; [::1]:8787 for IPv6)
    LLMROUTE_LOG_LEVEL            debug | info | warning | error | critical, any case (default info)
    LLMROUTE_STATUS_RELAY         the operator's status relay, an http(s) URL (default: poll pages directly)
    LLMROUTE_MAX_IN_FLIGHT        proxied requests served at once, a positive integer (default 512)
    LLMROUTE_MAX_BUFFERED_BYTES   request-body bytes held at once, a positive integer (default 128 MiB)
    LLMROUTE_STREAM_IDLE_TIMEOUT  longest silence between two reads of an upstream stream, seconds (90)
    LLMROUTE_IDLE_TIMEOUT         seconds a client connection may go without a complete request (15)
    LLMROUTE_HEALTH_LISTEN        host:port serving /healthz and /readyz alone, for kubelet probes (default: none)
    LLMROUTE_METRICS_LISTEN       host:port serving /metrics and /healthz alone, for Prometheus (default: none)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_LISTEN = "127.0.0.1:8787"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class EnvironmentProblem(ValueError):
    """A variable (or the flag standing in for it) holds a value the sidecar cannot use."""


@dataclass(frozen=True, slots=True)
class SidecarEnvironment:
    """What `llmroute sidecar` takes from its environment; None: the built-in default."""

    status_relay: str | None = None
    max_in_flight: int | None = None
    max_buffered_bytes: int | None = None
    stream_idle_timeout: float | None = None
    idle_timeout: float | None = None
    health_listen: str | None = None
    metrics_listen: str | None = None


def log_level(environ: Mapping[str, str] | None = None) -> int:
    """`LLMROUTE_LOG_LEVEL` as a logging level; any case, `warn` too."""
    raw = (os.environ if environ is None else environ).get("LLMROUTE_LOG_LEVEL", "").strip()
    if not raw:
        return logging.INFO
    name = raw.lower()
    if name == "warn":
        name = "warning"
    if name not in LOG_LEVELS:
        raise EnvironmentProblem(f"LLMROUTE_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)} (any case), got {raw!r}")
    level: int = logging.getLevelNamesMapping()[name.upper()]
    return level


def listen_address(value: str, name: str = "LLMROUTE_LISTEN") -> tuple[str, int]:
    """`host:port` (`[::1]:8787` for IPv6) as (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnvironmentProblem(
            f"{name}: expected host:port such as {DEFAULT_LISTEN} ([::1]:8787 for IPv6), got {value!r}"
        )
    return host, int(port)


def read_environment(environ: Mapping[str, str] | None = None) -> SidecarEnvironment:
    """Every sidecar variable checked; the first unusable one raises `EnvironmentProblem`."""
    env = os.environ if environ is None else environ

    def positive(name: str, kind: type[int] | type[float], what: str) -> float | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        try:
            number = kind(raw)
        except ValueError:
            number = 0
        if number <= 0:
            raise EnvironmentProblem(f"{name}: expected {what}, got {raw!r}")
        return number

    relay = env.get("LLMROUTE_STATUS_RELAY", "").strip() or None
    if relay is not None:
        parts = urlsplit(relay)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EnvironmentProblem(
                "LLMROUTE_STATUS_RELAY: expected an http(s) URL such as "
                f"http://llmroute-relay.llmroute-system:8080, got {relay!r}"
            )
    def address(name: str) -> str | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        host, port = listen_address(raw, name)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    in_flight = positive("LLMROUTE_MAX_IN_FLIGHT", int, "a positive integer (requests served at once)")
    buffered = positive("LLMROUTE_MAX_BUFFERED_BYTES", int, "a positive integer (bytes)")
    return SidecarEnvironment(
        status_relay=relay,
        max_in_flight=int(in_flight) if in_flight is not None else None,
        max_buffered_bytes=int(buffered) if buffered is not None else None,
        stream_idle_timeout=positive("LLMROUTE_STREAM_IDLE_TIMEOUT", float, "a positive number of seconds"),
        idle_timeout=positive("LLMROUTE_IDLE_TIMEOUT", float, "a positive number of seconds"),
        health_listen=address("LLMROUTE_HEALTH_LISTEN"),
        metrics_listen=address("LLMROUTE_METRICS_LISTEN"),
    )
