"""kopf bookkeeping of the reconciler: the digest diff base, and the retry delay after API failures."""

from __future__ import annotations

import json
from typing import Any

import kopf
import pytest

from llmroute_operator.diffbase import DigestDiffBaseStorage
from llmroute_operator.handlers import API_RETRY_DELAY, MAX_RETRY_DELAY, retry_delay

STORAGE = DigestDiffBaseStorage(prefix="llmroute.dev", key="last-handled-configuration")
KEY = "llmroute.dev/last-handled-configuration"


def body(spec: dict[str, Any], **annotations: str) -> kopf.Body:
    raw = {"apiVersion": "llmroute.dev/v1alpha1", "kind": "LLMRoutePolicy", "spec": spec,
           "metadata": {"name": "p", "namespace": "apps", "annotations": annotations}}  # fmt: skip
    return kopf.Body(raw)  # type: ignore[arg-type]


def stored_digest(of: kopf.Body) -> str:
    patch = kopf.Patch()
    STORAGE.store(body=of, patch=patch, essence=STORAGE.build(body=of))
    digest: str = patch["metadata"]["annotations"][KEY]
    return digest


def test_an_unchanged_object_has_no_diff_and_a_changed_one_has_one() -> None:
    digest = stored_digest(body({"a": 1}))
    assert digest.startswith("sha256:") and len(digest) == 71

    same = body({"a": 1}, **{KEY: digest, "llmroute.dev/reconcile_policy": '{"retries": 1}'})  # progress: ignored
    assert STORAGE.fetch(body=same) == STORAGE.build(body=same)
    edited = body({"a": 2}, **{KEY: digest})
    assert STORAGE.fetch(body=edited) == {}
    relabelled = body({"a": 1}, **{KEY: digest, "team": "search"})  # an annotation of the user's: a change
    assert STORAGE.fetch(body=relabelled) == {}
    assert STORAGE.fetch(body=body({"a": 1})) is None  # never handled


def test_the_previous_operators_full_essence_is_still_read() -> None:
    legacy = json.dumps({"spec": {"a": 1}}) + "\n"
    assert STORAGE.fetch(body=body({"a": 1}, **{KEY: legacy})) == {"spec": {"a": 1}}


@pytest.mark.parametrize("status", [0, 409, 429, 500, 503])
def test_transient_api_failures_are_retried_at_a_steady_pace(status: int) -> None:
    assert retry_delay(status, 0) == retry_delay(status, 20) == API_RETRY_DELAY


@pytest.mark.parametrize("status", [403, 401, 422])
def test_permanent_api_failures_back_off_up_to_a_cap(status: int) -> None:
    delays = [retry_delay(status, retry) for retry in range(12)]
    assert delays[:4] == [API_RETRY_DELAY, 2 * API_RETRY_DELAY, 4 * API_RETRY_DELAY, 8 * API_RETRY_DELAY]
    assert delays == sorted(delays) and delays[-1] == MAX_RETRY_DELAY
