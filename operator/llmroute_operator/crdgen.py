"""Generates the LLMRoutePolicy CustomResourceDefinition from the sidecar's policy model.

The pydantic model in `llmroute_sidecar.policy` is the one source of truth for what a policy may say;
the CRD is derived from it so the two cannot drift (`make crds` writes it, `make check` fails when the
committed copies differ from what this module builds).

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema. The conversion:
- `$ref`s are inlined (structural schemas have no references);
- `X | None` (`anyOf` with `null`) becomes plain `X` without `nullable`: the API server prunes a null
  from a non-nullable field, so `hedgeAfter: null` is stored as "unset", which is what the model means
  by None, and CEL rules never meet a null;
- `int | "timeout" | "connection"` becomes `x-kubernetes-int-or-string` plus a CEL rule for the strings;
- free-form maps (`params`, `jsonSchema`) become `x-kubernetes-preserve-unknown-fields`;
- `additionalProperties: false` is dropped next to `properties` (structural schemas forbid the pair;
  the API server prunes or, with strict field validation, rejects unknown fields instead);
- descriptions come from the model's attribute docstrings (read with `ast`), then from the table below
  for fields the model leaves undocumented, then from the docstring of the field's class;
- defaults are the model's own, serialised the way the sidecar writes them (Durations as `8s`);
- lists and maps get upper bounds, so the CEL cost estimator accepts the rules.
Cross-field checks the API server can refuse early are CEL `x-kubernetes-validations` with human messages.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import itertools
import re
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmroute_sidecar.durations import DURATION_PATTERN, format_duration
from llmroute_sidecar.policy import API_VERSION, KIND, PolicySpec

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "llmroutepolicies"
SINGULAR = "llmroutepolicy"
SHORT_NAMES = ["lrp"]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{GROUP}_{PLURAL}.yaml"
OUTPUTS = (Path("crds") / CRD_FILE, Path("charts/llmroute/files/crds") / CRD_FILE)
"""Where `main` writes the CRD, relative to the repository root; the chart's copy is templated, gated by
`crds.enabled` (a chart's own `crds/` folder cannot be switched off)."""

Schema = dict[str, Any]

FIELD_DESCRIPTIONS: dict[str, str] = {
    "PolicySpec.providers": "LLM API accounts the routes' targets use, each with a unique name.",
    "PolicySpec.defaultRoute": (
        "The route used by the compatible endpoints (/anthropic, /openai) when a request names none."
    ),
    "PolicySpec.routes": "The app's LLM features, each an ordered list of targets (primary first).",
    "PolicySpec.pricing": "USD per million tokens by model name, for the cost metrics. Optional.",
    "Provider.name": "Unique name of the provider; targets refer to it.",
    "Provider.type": "API dialect: anthropic, openai (any OpenAI-compatible base URL) or gemini.",
    "SecretKeyRef.name": "Name of the Secret, in the policy's namespace.",
    "SecretKeyRef.key": "Key within the Secret whose value is the API key.",
    "StatusPage.url": "URL of the status page's JSON (summary.json or incidents.json).",
    "StatusPage.pollInterval": "How often the page is polled (Go-style duration, e.g. 30s).",
    "Prompt.system": "System prompt sent to this target's model.",
    "Validate.minChars": "Answers shorter than this many characters fail the check.",
    "Validate.maxChars": "Answers longer than this many characters fail the check.",
    "Target.name": "Unique name of the target within its route.",
    "Target.provider": "Name of the provider (in spec.providers) that serves this target.",
    "Route.name": "Unique name of the route; apps name it in the URL or the llmroute-route header.",
    "Route.strategy": (
        "retryAndShed (default): retry the primary within the budget, then shed to fallbacks; failover: "
        "hot-cold, fall back on the first failure; hotHot: spread traffic across targets (needs "
        "acknowledgeOutputVariance); quorum: every request is a quorum request."
    ),
    "Route.retryOn": "What counts as retryable: HTTP status codes, `timeout` and `connection`.",
    "Route.targets": "Ordered targets: the first is the primary, the rest are fallbacks in order.",
    "Route.degradedNotice": "Notice returned with answers from a degraded target.",
    "Route.resumeStreams": "A stream broken mid-way resumes on the same target (prefill).",
    "Route.acknowledgeOutputVariance": (
        "Must be true for hotHot: prompts and outputs differ between models, and you accept that."
    ),
    "Backoff.initial": "Wait before the first retry (Go-style duration).",
    "Backoff.max": "Longest wait between retries (Go-style duration).",
    "Backoff.multiplier": "Factor the wait grows by after each retry.",
    "Backoff.jitter": "full (random 0..wait), equal (wait/2 + random 0..wait/2) or none.",
    "Quorum.sample": "Share of requests (0 to 1) that are quorum requests.",
    "Quorum.whenHeader": "Requests carrying all these header values are quorum requests.",
    "Quorum.grace": "With pick: best, how long to wait for better-ranked answers after the first.",
    "Quorum.hedgeAfter": ("Hedging: start the next target only when the previous one has no first byte by then."),
    "RetryBudget.ratio": "Retries may add at most this share of the provider's request rate.",
    "RetryBudget.minPerSecond": "Retries per second always allowed, whatever the ratio.",
    "RetryBudget.window": "Window over which requests and retries are counted (Go-style duration).",
    "CircuitBreaker.minFailures": "Failures needed, as well as openAfter, before the circuit opens.",
    "CircuitBreaker.probeInterval": "While open, one probe request per interval tests the target.",
    "Price.input": "USD per million input tokens.",
    "Price.output": "USD per million output tokens.",
}
"""Descriptions for fields the model leaves undocumented, keyed by `Class.jsonName`. The model's own
attribute docstrings win; move these into `policy.py` as docstrings and delete them here."""

BOUNDS: dict[str, dict[str, int]] = {
    "Route.retryOn": {"maxItems": 32},
    "Quorum.targets": {"maxItems": 16},
    "Quorum.whenHeader": {"maxProperties": 16},
    "StatusPage.partialShed": {"maxProperties": 16},
    "PolicySpec.pricing": {"maxProperties": 256},
}
"""Upper bounds the model does not state; the CEL cost estimator needs every list bounded."""

DURATION_DESCRIPTION = " Go-style duration, e.g. 250ms, 8s, 1m30s."
DURATION_MAX_LENGTH = 32
"""Bounds duration strings so CEL's `duration()` on them has a small estimated cost."""

SPEC_RULES: list[Schema] = [
    {
        "rule": "!has(self.defaultRoute) || self.routes.exists(r, r.name == self.defaultRoute)",
        "message": "defaultRoute must name one of spec.routes",
        "fieldPath": ".defaultRoute",
    },
    {
        "rule": "self.routes.all(r, r.targets.all(t, self.providers.exists(p, p.name == t.provider)))",
        "message": "every target's provider must name one of spec.providers",
        "fieldPath": ".routes",
    },
]
RULES: dict[str, list[Schema]] = {
    "PolicySpec.providers": [
        {
            "rule": "self.all(p, self.exists_one(q, q.name == p.name))",
            "message": "provider names must be unique",
        }
    ],
    "PolicySpec.routes": [
        {
            "rule": "self.all(r, self.exists_one(s, s.name == r.name))",
            "message": "route names must be unique",
        }
    ],
    "Route": [
        {
            "rule": (
                "!has(self.strategy) || self.strategy != 'hotHot' || "
                "(has(self.acknowledgeOutputVariance) && self.acknowledgeOutputVariance)"
            ),
            "message": (
                "hotHot spreads traffic across models whose prompts and outputs differ; "
                "set acknowledgeOutputVariance: true to accept that"
            ),
            "fieldPath": ".strategy",
        },
        {
            "rule": (
                "!has(self.quorum) || !has(self.quorum.targets) || "
                "self.quorum.targets.all(n, self.targets.exists(t, t.name == n))"
            ),
            "message": "quorum.targets must name targets of this route",
            "fieldPath": ".quorum.targets",
        },
        {
            "rule": "!has(self.budget) || duration(self.budget) > duration('0s')",
            "message": "budget must be greater than 0",
            "fieldPath": ".budget",
        },
        {
            "rule": ("!has(self.deadline) || !has(self.budget) || duration(self.deadline) >= duration(self.budget)"),
            "message": "deadline must not be shorter than the budget",
            "fieldPath": ".deadline",
        },
    ],
    "Route.targets": [
        {
            "rule": "self.all(t, self.exists_one(u, u.name == t.name))",
            "message": "target names must be unique within a route",
        }
    ],
    "Backoff": [
        {
            "rule": "!has(self.initial) || !has(self.max) || duration(self.initial) <= duration(self.max)",
            "message": "backoff.initial must not be larger than backoff.max",
            "fieldPath": ".initial",
        }
    ],
    "Provider": [
        {
            "rule": (
                "!has(self.baseURL) || self.baseURL.startsWith('https://') || "
                "(self.baseURL.startsWith('http://') && has(self.allowPlainHTTP) && self.allowPlainHTTP)"
            ),
            "message": "baseURL must be https:// (plain http:// only with allowPlainHTTP: true)",
            "fieldPath": ".baseURL",
        }
    ],
    "ApiKey": [
        {
            "rule": "(has(self.env) || has(self.file)) != has(self.secretKeyRef)",
            "message": "apiKey needs secretKeyRef (in a cluster), or env and/or file (standalone)",
        }
    ],
    "Quorum": [
        {
            "rule": "!has(self.sample) || (self.sample >= 0.0 && self.sample <= 1.0)",
            "message": "quorum.sample is a share of requests: between 0 and 1",
            "fieldPath": ".sample",
        }
    ],
    "Validate": [
        {
            "rule": "!has(self.minChars) || !has(self.maxChars) || self.minChars <= self.maxChars",
            "message": "validate.minChars must not be larger than validate.maxChars",
            "fieldPath": ".minChars",
        }
    ],
}
"""CEL rules by location: `Class` (the object), `Class.field` (the field's node), `Class.field[]` (its
items). The API server applies defaults before it evaluates rules; `has()` guards keep them correct
anyway. Every string a rule reads is bounded (maxLength or enum) and so is every list it walks: the API
server refuses a CRD whose rules' estimated cost is too high. `duration()` is CEL's, which parses
Go-style durations like the sidecar. `retryOn` strings (int-or-string items) have no rule: an unbounded
string comparison inside two nested lists would exceed the cost limit; the operator reports them."""


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from `root`, by name (the keys of pydantic's `$defs`)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                found[annotation.__name__] = annotation
                for info in annotation.model_fields.values():
                    visit(info.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(root)
    return found


def attribute_docstrings(cls: type[BaseModel]) -> dict[str, str]:
    """Field docstrings (a string literal right after the field), keyed by the field's JSON name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            info = cls.model_fields.get(statement.target.id)
            if info is not None:
                docs[info.alias or statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _prose(text: str) -> str:
    """Docstring text as one line per paragraph (hard wraps undone), as `kubectl explain` shows it."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _default(cls: type[BaseModel], json_name: str) -> Any:
    """The field's default as the model serialises it; PydanticUndefined when it has none worth stating."""
    for name, info in cls.model_fields.items():
        if (info.alias or name) != json_name:
            continue
        if info.default_factory is not None:
            factory = typing.cast(Callable[[], Any], info.default_factory)
            value = factory()
        else:
            value = info.default
        if value is PydanticUndefined or value is None:
            return PydanticUndefined
        if isinstance(value, BaseModel):
            return {}  # the nested object's own defaults fill it in
        if isinstance(value, (list, dict)) and not value:
            return PydanticUndefined  # empty is the same as absent: don't clutter stored objects
        return copy.deepcopy(value)
    raise KeyError(f"{cls.__name__} has no field {json_name}")


_COPIED = (
    "type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "minProperties", "maxProperties",
)  # fmt: skip
_UNDERSTOOD = {
    *_COPIED, "exclusiveMinimum", "exclusiveMaximum", "properties", "required", "additionalProperties",
    "items", "description", "default", "title", "anyOf",
}  # fmt: skip
"""JSON Schema keywords pydantic emits that the conversion handles; anything else is an error."""


class _Converter:
    """Turns pydantic's JSON Schema into a structural OpenAPI v3 schema, one node at a time."""

    def __init__(self, root: type[BaseModel]) -> None:
        self.schema = root.model_json_schema(by_alias=True)
        self.defs: dict[str, Schema] = dict(self.schema.get("$defs", {}))
        self.defs[root.__name__] = {k: v for k, v in self.schema.items() if k != "$defs"}
        self.classes = _model_classes(root)
        self.docs = {name: attribute_docstrings(cls) for name, cls in self.classes.items()}
        self.used_descriptions: set[str] = set()

    def resolve(self, node: Schema) -> tuple[Schema, str | None]:
        """Inline a `$ref` (keeping sibling keys) and strip `| None`; return the node and its class name."""
        if "anyOf" in node:
            variants = [v for v in node["anyOf"] if v != {"type": "null"}]
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if len(variants) == 1:
                return self.resolve({**variants[0], **rest})
            return node, None
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**self.defs[name], **rest}, name
        return node, None

    def convert(self, node: Schema, where: str) -> Schema:
        """Convert one node; `where` is its location key (`Class`, `Class.field`, `Class.field[]`)."""
        node, class_name = self.resolve(node)
        out: Schema = {}
        if "anyOf" in node:
            types = {v.get("type") for v in node["anyOf"]}
            if types != {"integer", "string"}:
                raise ValueError(f"{where}: cannot express the union {node['anyOf']} structurally")
            out["x-kubernetes-int-or-string"] = True
        unknown = node.keys() - _UNDERSTOOD
        if unknown:  # a constraint silently dropped here would make the CRD looser than the model
            raise ValueError(f"{where}: no structural translation for {sorted(unknown)}; extend crdgen")
        for key in _COPIED:
            if key in node:
                out[key] = node[key]
        for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if exclusive in node:  # JSON Schema's number form -> OpenAPI 3.0's boolean form
                out[bound], out[exclusive] = node[exclusive], True
        if node.get("type") == "object":
            if class_name is not None:
                self.convert_model(node, class_name, out)
            elif node.get("additionalProperties") is True or "additionalProperties" not in node:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(node["additionalProperties"], dict):
                out["additionalProperties"] = self.convert(node["additionalProperties"], where + "{}")
        if node.get("type") == "array":
            out["items"] = self.convert(node["items"], where + "[]")
        if class_name is not None and node.get("description"):
            out["description"] = _prose(node["description"])
        if out.get("pattern") == DURATION_PATTERN:
            out.setdefault("maxLength", DURATION_MAX_LENGTH)
        out.update(BOUNDS.get(where, {}))
        rules = RULES.get(class_name or "", []) + RULES.get(where, [])
        if rules:
            out["x-kubernetes-validations"] = copy.deepcopy(rules)
        return out

    def convert_model(self, node: Schema, class_name: str, out: Schema) -> None:
        cls = self.classes[class_name]
        properties: dict[str, Schema] = {}
        for json_name, child in node.get("properties", {}).items():
            where = f"{class_name}.{json_name}"
            converted = self.convert(child, where)
            description = (
                child.get("description")
                or self.docs[class_name].get(json_name)
                or FIELD_DESCRIPTIONS.get(where)
                or converted.get("description")
            )
            if where in FIELD_DESCRIPTIONS:
                self.used_descriptions.add(where)
            if not description:
                raise ValueError(f"{where}: no description; add a docstring in policy.py")
            description = _prose(description)
            if converted.get("pattern") == DURATION_PATTERN and "Go-style" not in description:
                description += DURATION_DESCRIPTION
            converted["description"] = description
            default = _default(cls, json_name)
            if default is not PydanticUndefined:
                if converted.get("pattern") == DURATION_PATTERN and isinstance(default, float | int):
                    default = format_duration(float(default))
                converted["default"] = default
            properties[json_name] = converted
        out["properties"] = properties
        if node.get("required"):
            out["required"] = list(node["required"])


def spec_schema() -> Schema:
    """The structural schema of `.spec`, derived from `PolicySpec`."""
    converter = _Converter(PolicySpec)
    schema = converter.convert({"$ref": "#/$defs/PolicySpec"}, "PolicySpec")
    schema.setdefault("x-kubernetes-validations", [])
    schema["x-kubernetes-validations"] = SPEC_RULES + schema["x-kubernetes-validations"]
    stale = set(FIELD_DESCRIPTIONS) - converter.used_descriptions
    if stale:
        raise ValueError(f"FIELD_DESCRIPTIONS names fields the model no longer has: {sorted(stale)}")
    return schema


def status_schema() -> Schema:
    """What the operator reports (contract §5); kept small and bounded."""
    condition: Schema = {
        "type": "object",
        "description": "A Kubernetes condition (Ready, and warnings such as HotHotRouting).",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "maxLength": 316, "description": "Condition type, e.g. Ready."},
            "status": {
                "type": "string",
                "enum": ["True", "False", "Unknown"],
                "description": "True, False or Unknown.",
            },
            "reason": {
                "type": "string",
                "maxLength": 1024,
                "description": "Machine-readable CamelCase reason for the last transition.",
            },
            "message": {
                "type": "string",
                "maxLength": 32768,
                "description": "Human-readable details, with the field path for validation errors.",
            },
            "lastTransitionTime": {
                "type": "string",
                "format": "date-time",
                "description": "When the status last changed.",
            },
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "The .metadata.generation the condition was set for.",
            },
        },
    }
    return {
        "type": "object",
        "description": "What the operator observed and did; written by the operator only.",
        "properties": {
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "description": "The .metadata.generation the status reflects.",
            },
            "conditions": {
                "type": "array",
                "maxItems": 16,
                "description": "Ready, and warnings such as HotHotRouting, BudgetOutOfRange, MissingSecret.",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "configMap": {
                "type": "string",
                "description": "Name of the ConfigMap holding the rendered sidecar config (policy.json).",
            },
            "configHash": {
                "type": "string",
                "description": "Digest of the effective spec; injected pods carry it in their annotation.",
            },
            "secretKeyRefs": {
                "type": "array",
                "maxItems": 64,
                "description": (
                    "The Secret key of each provider in the config the ConfigMap holds (configHash): what the "
                    "webhook injects while a newer spec is invalid or not yet rendered."
                ),
                "items": {
                    "type": "object",
                    "required": ["provider", "name", "key"],
                    "properties": {
                        "provider": {"type": "string", "maxLength": 63, "description": "The provider's name."},
                        "name": {"type": "string", "maxLength": 253, "description": "The Secret's name."},
                        "key": {"type": "string", "maxLength": 253, "description": "The key in that Secret."},
                    },
                },
            },
            "routes": {
                "type": "array",
                "maxItems": 128,
                "items": {"type": "string"},
                "description": "Names of the policy's routes.",
            },
            "warnings": {
                "type": "array",
                "maxItems": 512,
                "items": {"type": "string"},
                "description": "Legal but risky settings, each as `path: message`.",
            },
            "sheddingProviders": {
                "type": "array",
                "maxItems": 32,
                "items": {"type": "string"},
                "description": "Providers whose status page currently sheds traffic.",
            },
            "kopf": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "The operator framework's own bookkeeping.",
            },
        },
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest for LLMRoutePolicy."""
    schema: Schema = {
        "type": "object",
        "description": (
            "LLMRoutePolicy: how an app's LLM features fail over between providers. Pods annotated "
            "llmroute.dev/policy: <name> get a sidecar that applies it."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this representation of an object.",
            },
            "kind": {"type": "string", "description": "REST resource this object represents."},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "llmroute", "app.kubernetes.io/part-of": "llmroute"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": KIND + "List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["llmroute"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Routes",
                            "type": "string",
                            "jsonPath": ".status.routes",
                            "description": "Names of the routes.",
                        },
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                            "description": "Whether the policy is rendered and usable.",
                        },
                        {
                            "name": "Shedding",
                            "type": "string",
                            "jsonPath": ".status.sheddingProviders",
                            "description": "Providers whose status page currently sheds traffic.",
                        },
                        {
                            "name": "Hash",
                            "type": "string",
                            "jsonPath": ".status.configHash",
                            "priority": 1,
                            "description": "Digest of the effective spec.",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the committed YAML text."""
    header = (
        "# Generated by `make crds` (python -m llmroute_operator.crdgen) from llmroute_sidecar.policy.\n"
        "# Do not edit by hand: change the model, then regenerate.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=True, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write the CRD into the repository, or with `--check` report the copies that drifted."""
    parser = argparse.ArgumentParser(
        prog="python -m llmroute_operator.crdgen", description="Generate the LLMRoutePolicy CRD."
    )
    parser.add_argument("--check", action="store_true", help="fail (exit 1) when a committed copy differs")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: cwd)")
    args = parser.parse_args(argv)
    root: Path = args.root
    if not (root / "charts" / "llmroute").is_dir():
        parser.error(f"{root} does not look like the llmroute repository (no charts/llmroute)")
    text = render_crd()
    drifted = []
    for relative in OUTPUTS:
        path = root / relative
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            drifted.append(str(relative))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {relative}")
    if drifted:
        print(f"out of date, run `make crds`: {', '.join(drifted)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
