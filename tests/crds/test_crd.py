"""The LLMRoutePolicy CRD: valid for Kubernetes, structural, generated from the model without drift."""

from __future__ import annotations

import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from tests.crds.apiserver import (
    CRD_PATH,
    ROOT,
    admit,
    apply_defaults,
    children,
    load_crd,
    root_schema,
    to_json_schema,
)

from llmroute_operator import crdgen
from llmroute_sidecar.durations import DURATION_PATTERN
from llmroute_sidecar.policy import PolicySpec, load_policy

KUBERNETES_VERSIONS = ["1.29", "1.33"]
CHART_COPY = ROOT / "charts" / "llmroute" / "files" / "crds" / CRD_PATH.name
Schema = dict[str, Any]


def walk(schema: Schema, path: str = "") -> list[tuple[str, Schema]]:
    nodes = [(path, schema)]
    for suffix, child in children(schema):
        nodes.extend(walk(child, path + suffix))
    return nodes


def spec_schema() -> Schema:
    schema: Schema = root_schema()["properties"]["spec"]
    return schema


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_is_a_valid_kubernetes_manifest(version: str) -> None:
    kubernetes_validate.validate(load_crd(), version, strict=True)


def test_crd_name_is_plural_dot_group_and_names_match_the_contract() -> None:
    crd = load_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == "llmroutepolicies.llmroute.dev"
    assert spec["names"]["kind"] == "LLMRoutePolicy"
    assert spec["names"]["shortNames"] == ["lrp"]
    assert spec["scope"] == "Namespaced"
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_committed_crd_is_what_crdgen_builds() -> None:
    assert yaml.safe_load(CRD_PATH.read_text(encoding="utf-8")) == crdgen.build_crd()
    assert CRD_PATH.read_text(encoding="utf-8") == crdgen.render_crd(), "run `make crds`"


def test_chart_copy_of_the_crd_is_identical() -> None:
    assert CHART_COPY.read_bytes() == CRD_PATH.read_bytes(), "run `make crds`"


def test_check_mode_fails_on_drift_and_passes_after_regenerating(tmp_path: Path) -> None:
    (tmp_path / "charts" / "llmroute").mkdir(parents=True)
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1  # missing copies are drift too
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 0
    stale = tmp_path / "crds" / CRD_PATH.name
    stale.write_text(stale.read_text(encoding="utf-8").replace("maxItems: 16", "maxItems: 17"), encoding="utf-8")
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1


def test_schema_is_structural() -> None:
    """What the API server demands of a structural schema (it would refuse the CRD otherwise)."""
    problems = []
    for path, node in walk(root_schema()):
        forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "definitions", "$defs", "title"} & node.keys()
        if forbidden:
            problems.append(f"{path}: {sorted(forbidden)}")
        special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        if "type" not in node and not special:
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if node.get("x-kubernetes-int-or-string") and "type" in node:
            problems.append(f"{path}: int-or-string with a type")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        shapeless = "properties" not in node and not isinstance(node.get("additionalProperties"), dict)
        if node.get("type") == "object" and shapeless and not special and path != ".metadata":
            problems.append(f"{path}: object without a shape")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{path}: required {name} is not a property")
    assert root_schema()["properties"]["metadata"] == {"type": "object"}
    assert not problems, problems


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = [
        path
        for path, node in walk(root_schema())
        if path and not path.endswith(("[]", "{}")) and path != ".metadata" and not node.get("description")
    ]
    assert not missing, missing


def test_every_list_and_map_is_bounded_for_the_cel_cost_estimator() -> None:
    unbounded = []
    for path, node in walk(root_schema()):
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
        if isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
            unbounded.append(path)
    assert not unbounded, unbounded


def test_strings_read_by_cel_rules_are_bounded() -> None:
    """A rule over an unbounded string inside bounded lists still blows the CRD's cost budget."""
    for path, node in walk(root_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            read = re.sub(r"has\([^)]*\)", "", rule["rule"])  # has() tests presence, reads no value
            for field in re.findall(r"\.([A-Za-z]+)\b(?!\()", read):
                for _, child in walk(node):
                    target = child.get("properties", {}).get(field)
                    if target and target.get("type") == "string":
                        assert "maxLength" in target or "enum" in target, (path, field)


def test_defaults_are_valid_for_their_own_schema() -> None:
    """The API server refuses a CRD whose defaults its own schema would reject."""
    checked = 0
    for path, node in walk(root_schema()):
        if "default" in node:
            defaulted = apply_defaults(node["default"], node)
            errors = list(jsonschema.Draft7Validator(to_json_schema(node)).iter_errors(defaulted))
            assert not errors, (path, [e.message for e in errors])
            checked += 1
    assert checked > 20


def test_crd_defaults_agree_with_the_model_defaults() -> None:
    """A policy defaulted by the API server means exactly what the raw policy means to the sidecar."""
    for case in sorted((ROOT / "tests" / "crds" / "cases" / "valid").glob("*.yaml")):
        document = yaml.safe_load(case.read_text(encoding="utf-8"))
        stored = admit(document).stored
        assert load_policy(stored).config_hash == load_policy(document).config_hash, case.name


def _model_paths(model: type[BaseModel], prefix: str, seen: tuple[type, ...] = ()) -> set[str]:
    paths: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}.{info.alias or name}"
        paths.add(path)
        paths |= _annotation_paths(info.annotation, path, (*seen, model))
    return paths


def _annotation_paths(annotation: Any, path: str, seen: tuple[type, ...]) -> set[str]:
    origin = typing.get_origin(annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return _model_paths(annotation, path, seen) if annotation not in seen else set()
    if origin is list:
        return _annotation_paths(typing.get_args(annotation)[0], path + "[]", seen)
    if origin is dict:
        return _annotation_paths(typing.get_args(annotation)[1], path + "{}", seen)
    if origin in (typing.Union, types.UnionType):
        found: set[str] = set()
        for arg in typing.get_args(annotation):
            found |= _annotation_paths(arg, path, seen)
        return found
    return set()


def test_crd_and_model_have_exactly_the_same_fields() -> None:
    model = _model_paths(PolicySpec, "")
    crd = {path for path, _ in walk(spec_schema()) if path and not path.endswith(("[]", "{}"))}
    assert crd - model == set(), "fields in the CRD the model does not know"
    assert model - crd == set(), "fields in the model the CRD does not know"


def test_crd_and_model_agree_on_required_fields_and_enums() -> None:
    for path, node in walk(spec_schema()):
        if "enum" in node:
            assert node.get("type") == "string", path
    schema = PolicySpec.model_json_schema(by_alias=True)
    assert set(spec_schema()["required"]) == set(schema["required"])
    for name, definition in schema["$defs"].items():
        if definition.get("required"):
            holders = [
                n for _, n in walk(spec_schema()) if set(n.get("properties", {})) == set(definition["properties"])
            ]
            assert holders, name
            assert all(set(h.get("required", [])) == set(definition["required"]) for h in holders), name


def test_status_schema_and_printer_columns() -> None:
    version = load_crd()["spec"]["versions"][0]
    status = root_schema()["properties"]["status"]["properties"]
    assert {
        "observedGeneration",
        "conditions",
        "configMap",
        "configHash",
        "routes",
        "sheddingProviders",
    } <= set(status)
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:3] == ["Routes", "Ready", "Shedding"] and "Age" in columns
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    for column in columns.values():
        first = column["jsonPath"].split(".")[1:3]
        if first[0] == "status":
            assert first[1].split("[")[0] in status, column


def test_durations_carry_the_go_pattern_and_a_length_bound() -> None:
    durations = [(p, n) for p, n in walk(spec_schema()) if n.get("pattern") == DURATION_PATTERN]
    assert {p for p, _ in durations} >= {
        ".routes[].budget",
        ".routes[].quorum.hedgeAfter",
        ".retryBudget.window",
    }
    for path, node in durations:
        assert node["type"] == "string" and node["maxLength"] == crdgen.DURATION_MAX_LENGTH, path
        if "default" in node:
            assert re.fullmatch(node["pattern"], node["default"]), path


def test_status_the_operator_writes_fits_the_status_schema() -> None:
    """A status field the schema lacks is pruned silently by the API server: the two must agree."""
    import datetime

    from llmroute_operator.reconcile import build_status
    from llmroute_sidecar.policy import PolicyError

    status_schema = to_json_schema(root_schema()["properties"]["status"])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    document = yaml.safe_load((ROOT / "tests" / "crds" / "cases" / "valid" / "every-field.yaml").read_text())
    good = build_status(
        None, policy=load_policy(document), generation=3, now=now, configmap="x-llmroute", missing=["llm-keys"]
    )
    with pytest.raises(PolicyError) as refused:
        load_policy({"spec": {"providers": [], "routes": []}})
    bad = build_status(good, policy=refused.value, generation=4, now=now, configmap="x-llmroute")
    for status in (good, bad):
        errors = [e.message for e in jsonschema.Draft7Validator(status_schema).iter_errors(status)]
        assert not errors, (status, errors)
    assert {"configMap", "configHash", "routes", "conditions", "observedGeneration"} <= set(good)
