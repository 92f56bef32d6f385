"""Fake LLM providers and status pages that fail on cue.

Real providers cannot be made to return 529s, drop streams or hang on demand, so the sidecar's tests and
the ``llmroute demo`` / ``llmroute simulate`` scenarios run against these loopback servers instead.
"""
