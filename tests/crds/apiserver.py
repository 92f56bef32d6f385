"""What the Kubernetes API server does to an LLMRoutePolicy before storing it, without a cluster.

kmock accepts anything, so the CRD's own rules are exercised here instead, in the API server's order:
prune nulls from non-nullable fields, apply the schema's defaults (top-down), validate against the
OpenAPI schema (unknown fields rejected, as with `kubectl apply --validate=strict`), then evaluate every
`x-kubernetes-validations` rule where the schema puts it, with cel-python.

Differences from the real thing are deliberate and small (KUBERNETES-TESTING.md): numbers under
`type: number` become floats first (Kubernetes types them as double; cel-python will not compare an int
with a double); an evaluation error counts as a failed rule (Kubernetes also refuses the object); and
CEL's `duration()` is given Go's `time.ParseDuration` grammar, which is what cel-go uses and what
cel-python lacks (it rejects `0` and `1.5h`). Cost estimation is not emulated.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "llmroute.dev_llmroutepolicies.yaml"
Schema = dict[str, Any]

_GO_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9}
_GO_UNITS["h"] = 60 * _GO_UNITS["m"]
_GO_PART = re.compile(r"(\d*)(?:\.(\d*))?(ns|us|µs|μs|ms|s|m|h)")


def go_duration_nanos(text: str) -> int:
    """Go's time.ParseDuration (unsigned), in nanoseconds; ValueError when Go would refuse it."""
    if text == "0":
        return 0
    position, total = 0, 0
    while position < len(text):
        match = _GO_PART.match(text, position)
        whole, fraction = (match.group(1), match.group(2)) if match else ("", None)
        if not match or (not whole and not fraction):
            raise ValueError(f"time: invalid duration {text!r}")
        unit = _GO_UNITS[match.group(3)]
        total += int(whole or 0) * unit
        if fraction:
            total += int(fraction) * unit // 10 ** len(fraction)
        position = match.end()
    if not text:
        raise ValueError("time: invalid duration ''")
    return total


def _cel_duration(value: Any) -> celtypes.DurationType:
    if isinstance(value, celtypes.DurationType):
        return value
    seconds, nanos = divmod(go_duration_nanos(str(value)), 10**9)
    return celtypes.DurationType(seconds=seconds, nanos=nanos)


@cache
def load_crd() -> Schema:
    crd: Schema = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    return crd


def root_schema(crd: Schema | None = None) -> Schema:
    version: Schema = (crd or load_crd())["spec"]["versions"][0]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def children(schema: Schema) -> list[tuple[str, Schema]]:
    """(path suffix, child schema) for every schema directly below this one."""
    out = [(f".{name}", child) for name, child in schema.get("properties", {}).items()]
    if isinstance(schema.get("additionalProperties"), dict):
        out.append(("{}", schema["additionalProperties"]))
    if "items" in schema:
        out.append(("[]", schema["items"]))
    return out


def rules(schema: Schema, path: str = "") -> list[tuple[str, Schema]]:
    """Every CEL rule in a schema with the schema path it sits at (`.spec.routes[]`)."""
    found = [(path, rule) for rule in schema.get("x-kubernetes-validations", [])]
    for suffix, child in children(schema):
        found.extend(rules(child, path + suffix))
    return found


def prune_nulls(value: Any, schema: Schema) -> Any:
    """Drop null values of non-nullable fields (the API server does this before defaulting)."""
    if isinstance(value, dict) and "properties" in schema:
        return {
            key: prune_nulls(item, schema["properties"].get(key, {}))
            for key, item in value.items()
            if item is not None or schema["properties"].get(key, {}).get("nullable")
        }
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {key: prune_nulls(item, schema["additionalProperties"]) for key, item in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [prune_nulls(item, schema["items"]) for item in value]
    return value


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Fill absent fields from `default`, top-down, so a defaulted `{}` gets its own defaults too."""
    if isinstance(value, dict) and "properties" in schema:
        result = dict(value)
        for key, child in schema["properties"].items():
            if key not in result and "default" in child:
                result[key] = copy.deepcopy(child["default"])
            if key in result:
                result[key] = apply_defaults(result[key], child)
        return result
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {key: apply_defaults(item, schema["additionalProperties"]) for key, item in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def to_json_schema(schema: Schema) -> Schema:
    """The OpenAPI v3 (structural) schema as JSON Schema, with unknown fields rejected."""
    out: Schema = {
        key: value
        for key, value in schema.items()
        if not key.startswith("x-kubernetes-")
        and key not in ("properties", "items", "additionalProperties", "nullable", "default")
    }
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    if "properties" in schema:
        out["properties"] = {name: to_json_schema(child) for name, child in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = to_json_schema(schema["items"])
    return out


def schema_errors(value: Any, schema: Schema) -> list[str]:
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_json_path(error.absolute_path)}: {error.message}" for error in errors]


def _json_path(parts: Any) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


def typed_for_cel(value: Any, schema: Schema) -> Any:
    """Numbers under `type: number` as floats, as Kubernetes types them."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict) and "properties" in schema:
        return {k: typed_for_cel(v, schema["properties"].get(k, {})) for k, v in value.items()}
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: typed_for_cel(v, schema["additionalProperties"]) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [typed_for_cel(item, schema["items"]) for item in value]
    return value


_ENVIRONMENT = celpy.Environment()


@cache
def compiled(rule: str) -> celpy.Runner:
    """A runnable CEL program (raises celpy.CELParseError on a syntax error)."""
    return _ENVIRONMENT.program(_ENVIRONMENT.compile(rule), functions={"duration": _cel_duration})


@dataclass
class RuleOutcome:
    path: str
    rule: str
    message: str
    passed: bool
    error: str | None = None


@dataclass
class Admission:
    """The stored object (after pruning and defaulting) and everything that refused it."""

    stored: Any
    schema_errors: list[str] = field(default_factory=list)
    outcomes: list[RuleOutcome] = field(default_factory=list)

    @property
    def cel_messages(self) -> list[str]:
        return [outcome.message for outcome in self.outcomes if not outcome.passed]

    @property
    def errors(self) -> list[str]:
        return self.schema_errors + [f"{o.path}: {o.message}" for o in self.outcomes if not o.passed]


def evaluate_rules(value: Any, schema: Schema, path: str = "") -> list[RuleOutcome]:
    """Evaluate every rule at every place the schema puts one, over `value` (absent values: skipped)."""
    outcomes: list[RuleOutcome] = []
    if value is None:
        return outcomes
    for rule in schema.get("x-kubernetes-validations", []):
        activation = {"self": json_to_cel(typed_for_cel(value, schema))}
        try:
            result: Any = compiled(rule["rule"]).evaluate(activation)
            passed, error = isinstance(result, celtypes.BoolType) and bool(result), None
            if isinstance(result, CELEvalError):
                passed, error = False, str(result)
        except Exception as exc:  # an evaluation error fails the rule, as on the API server
            passed, error = False, f"{type(exc).__name__}: {exc}"
        outcomes.append(RuleOutcome(path, rule["rule"], rule["message"], passed, error))
    if isinstance(value, dict) and "properties" in schema:
        for key, child in schema["properties"].items():
            if key in value:
                outcomes.extend(evaluate_rules(value[key], child, f"{path}.{key}"))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            outcomes.extend(evaluate_rules(item, schema["additionalProperties"], f"{path}[{key}]"))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            outcomes.extend(evaluate_rules(item, schema["items"], f"{path}[{index}]"))
    return outcomes


def admit(document: Schema, crd: Schema | None = None) -> Admission:
    """Run a custom resource through pruning, defaulting, schema validation and CEL."""
    schema = root_schema(crd)
    stored = apply_defaults(prune_nulls(document, schema), schema)
    return Admission(
        stored=stored,
        schema_errors=schema_errors(stored, schema),
        outcomes=evaluate_rules(stored, schema),
    )
