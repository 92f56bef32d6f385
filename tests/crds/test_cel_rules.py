"""The CRD's CEL rules, compiled and evaluated with cel-python on one case per file.

`cases/valid/*.yaml` must pass every rule (and the schema, and the sidecar's own loader);
`cases/invalid/*.yaml` each start with `# expect: <rule message>` and must trip that rule, and the
sidecar's loader must refuse them too: the API server and the model agree on what a bad policy is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.crds.apiserver import admit, children, compiled, go_duration_nanos, load_crd, root_schema, rules

from llmroute_sidecar.policy import PolicyError, load_policy

CASES = Path(__file__).parent / "cases"
VALID = sorted((CASES / "valid").glob("*.yaml"))
INVALID = sorted((CASES / "invalid").glob("*.yaml"))
ALL_RULES = rules(root_schema())


def read_case(path: Path) -> tuple[dict[str, Any], str | None]:
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    expected = first.removeprefix("# expect:").strip() if first.startswith("# expect:") else None
    return yaml.safe_load(text), expected


def test_the_crd_has_the_rules_the_design_asks_for() -> None:
    messages = {rule["message"] for _, rule in ALL_RULES}
    assert {
        "provider names must be unique",
        "target names must be unique within a route",
        "every target's provider must name one of spec.providers",
        "defaultRoute must name one of spec.routes",
        "apiKey needs secretKeyRef (in a cluster), or env and/or file (standalone)",
        "quorum.sample is a share of requests: between 0 and 1",
    } <= messages
    assert any(m.startswith("hotHot spreads traffic") for m in messages)
    assert len(messages) == len(ALL_RULES), "two rules share a message: cases could not tell them apart"


@pytest.mark.parametrize(("path", "rule"), ALL_RULES, ids=[r["message"][:40] for _, r in ALL_RULES])
def test_every_rule_compiles(path: str, rule: dict[str, Any]) -> None:
    compiled(rule["rule"])
    assert rule["message"] and not rule["message"].endswith("."), path


@pytest.mark.parametrize("case", VALID, ids=[p.stem for p in VALID])
def test_valid_case_passes_schema_rules_and_the_model(case: Path) -> None:
    document, _ = read_case(case)
    admission = admit(document)
    assert admission.errors == []
    assert not [o for o in admission.outcomes if o.error], "a rule raised instead of deciding"
    load_policy(document)
    load_policy(admission.stored)


@pytest.mark.parametrize("case", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_case_trips_its_rule_and_the_model_refuses_it_too(case: Path) -> None:
    document, expected = read_case(case)
    assert expected, f"{case.name} must start with '# expect: <rule message>'"
    assert expected in {rule["message"] for _, rule in ALL_RULES}, "no rule has that message"
    admission = admit(document)
    assert expected in admission.cel_messages
    assert set(admission.cel_messages) == {expected}, "the case should trip only its own rule"
    with pytest.raises(PolicyError):
        load_policy(document)


def test_every_rule_is_tripped_by_an_invalid_case() -> None:
    tripped = {read_case(case)[1] for case in INVALID}
    untested = {rule["message"] for _, rule in ALL_RULES} - tripped
    assert not untested, f"add a case under {CASES / 'invalid'} for: {sorted(untested)}"


def test_every_rule_is_evaluated_and_passes_on_some_valid_case() -> None:
    passed = {o.rule for case in VALID for o in admit(read_case(case)[0]).outcomes if o.passed}
    unexercised = {rule["rule"] for _, rule in ALL_RULES} - passed
    assert not unexercised, f"no valid case reaches: {sorted(unexercised)}"


def test_a_whole_number_where_the_schema_says_number_is_compared_as_a_double() -> None:
    document, _ = read_case(CASES / "valid" / "duration-spellings.yaml")
    assert document["spec"]["routes"][0]["quorum"]["sample"] == 1  # an int in YAML
    assert admit(document).errors == []


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("0", 0),
        ("8s", 8 * 10**9),
        ("250ms", 250 * 10**6),
        ("1m30s", 90 * 10**9),
        ("1.5h", 5400 * 10**9),
        ("10us", 10_000),
        ("10µs", 10_000),
        ("1.s", 10**9),
    ],
)
def test_rules_see_durations_the_way_go_parses_them(text: str, nanos: int) -> None:
    assert go_duration_nanos(text) == nanos


@pytest.mark.parametrize("text", ["", "8", "s", "1d", "-1s", ".s"])
def test_durations_go_would_refuse_fail_the_rule(text: str) -> None:
    with pytest.raises(ValueError):
        go_duration_nanos(text)


def test_rules_sit_where_they_can_see_what_they_check() -> None:
    where = {rule["message"]: path for path, rule in ALL_RULES}
    assert where["every target's provider must name one of spec.providers"] == ".spec"
    assert where["defaultRoute must name one of spec.routes"] == ".spec"
    assert where["target names must be unique within a route"] == ".spec.routes[].targets"
    assert where["apiKey needs secretKeyRef (in a cluster), or env and/or file (standalone)"] == (
        ".spec.providers[].apiKey"
    )
    assert load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"
    ]


def test_every_field_path_points_into_the_schema_below_its_rule() -> None:
    """The API server refuses a CRD whose rule names a fieldPath its schema does not have."""
    nodes = {path: node for path, node in _walk(root_schema())}
    for path, rule in ALL_RULES:
        if "fieldPath" not in rule:
            continue
        node = nodes[path]
        for part in rule["fieldPath"].split(".")[1:]:
            node = node["properties"][part]
        assert node, rule


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for suffix, child in children(schema):
        found.extend(_walk(child, path + suffix))
    return found
