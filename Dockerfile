# syntax=docker/dockerfile:1
# One image for every llmroute process: `llmroute operator`, `llmroute webhook` (injector + status relay)
# and `llmroute sidecar` (injected next to apps). Runs as the non-root uid 65532 with a read-only root
# filesystem in the chart; nothing is written outside /tmp.
#
#   docker build -t ghcr.io/llmroute/llmroute:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/llmroute
WORKDIR /src
# Everything pyproject.toml builds the wheel from: the two packages, the README (the package's long
# description) and the example scenarios and demo policy that `llmroute demo` ships with (force-include).
# tests/charts/test_image.py builds the wheel from exactly what these lines and .dockerignore let in.
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY operator/ operator/
COPY examples/scenarios/ examples/scenarios/
COPY examples/demo-policy.yaml examples/
RUN /opt/llmroute/bin/pip install . \
    && /opt/llmroute/bin/python -m compileall -q /opt/llmroute/lib \
    && /opt/llmroute/bin/llmroute --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llmroute" \
      org.opencontainers.image.description="LLM failover sidecar and Kubernetes operator" \
      org.opencontainers.image.source="https://github.com/llmroute/llmroute" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/llmroute /opt/llmroute
ENV PATH=/opt/llmroute/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# 8787 sidecar, 8443 webhook (TLS), 8080 status relay, 8081 health.
EXPOSE 8787 8443 8080 8081
USER 65532:65532
ENTRYPOINT ["llmroute"]
CMD ["--help"]
