"""2. Every case of tests/crds/cases against the real API server: what cel-python and the emulated
admission (tests/crds/apiserver.py) decide, the server decides too. Server-side dry runs: the server
prunes, defaults and validates (schema and CEL) and stores nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.crds.apiserver import admit, root_schema, rules
from tests.crds.test_cel_rules import INVALID, VALID, read_case
from tests.e2e.cluster import ApiError
from tests.e2e.conftest import APP_NAMESPACE, Release

pytestmark = pytest.mark.e2e
COLLECTION = f"/apis/llmroute.dev/v1alpha1/namespaces/{APP_NAMESPACE}/llmroutepolicies"
DRY_RUN = "?dryRun=All&fieldValidation=Strict"
RULE_MESSAGES = {rule["message"] for _, rule in rules(root_schema())}


def _create(release: Release, document: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = release.cluster.api("POST", COLLECTION + DRY_RUN, document)
    return created


@pytest.mark.parametrize("case", VALID, ids=[p.stem for p in VALID])
def test_the_server_accepts_each_valid_case_and_defaults_it_as_emulated(release: Release, case: Path) -> None:
    document, _ = read_case(case)
    stored = _create(release, document)
    assert stored["spec"] == admit(document).stored["spec"], "the server's defaulting differs from the emulation"


@pytest.mark.parametrize("case", INVALID, ids=[p.stem for p in INVALID])
def test_the_server_refuses_each_invalid_case_with_its_rules_message(release: Release, case: Path) -> None:
    document, expected = read_case(case)
    assert expected
    with pytest.raises(ApiError) as refused:
        _create(release, document)
    assert refused.value.status == 422, refused.value.body
    causes = [cause.get("message", "") for cause in refused.value.body.get("details", {}).get("causes", [])]
    tripped = {message for message in RULE_MESSAGES if any(message in cause for cause in causes)}
    assert tripped == {expected}, f"the server said: {refused.value.body.get('message')}"
