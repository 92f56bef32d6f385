"""`llmroute sidecar` with tracing on, exported to nowhere: the benchmark's "telemetry on" sidecar.

Why this exists: with no `OTEL_*` variables the sidecar's tracer is a no-op, which would flatter the
throughput figure. Here the real OpenTelemetry SDK records every span (always-on sampling, one server span
and one client span per request, all attributes) through a BatchSpanProcessor, and the exporter drops the
batches: the benchmark charges the sidecar for instrumentation, not for a collector's network round trips
(with OTLP export, the encoding runs on the export thread of the same process and costs more; `bench.py
--otlp` measures that variant against a local sink). Everything else is `llmroute sidecar` unchanged.

    python bench/sidecar_traced.py --policy FILE --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from llmroute_sidecar import cli, telemetry


class DiscardExporter(SpanExporter):
    """Counts the spans it is given and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        print(f"discard exporter: {self.spans} spans", file=sys.stderr)


def _provider() -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "llmroute-sidecar"}))
    provider.add_span_processor(BatchSpanProcessor(DiscardExporter()))
    return provider


if __name__ == "__main__":
    telemetry.tracer_provider_from_env = _provider
    sys.exit(cli.main(["sidecar", *sys.argv[1:]]))
