"""The Helm chart, rendered by a real helm: lint-clean, valid Kubernetes, and internally consistent.

Consistency is what kubernetes-validate cannot see: selectors that match their pods, a webhook that points
at a Service port that reaches the container port the server listens on, a CA bundle that signed the
serving certificate, a restricted security context, least-privilege RBAC.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tests.helm import helm_binary

from llmroute_operator import crdgen
from llmroute_sidecar.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmroute"
RELEASE, NAMESPACE = "llmroute", "llmroute-system"
KUBERNETES_VERSION = "1.33"
NOT_IN_KUBERNETES = {"Issuer", "Certificate"}  # cert-manager's kinds: no offline schema
VARIANTS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "cert-manager": ("--set", "certManager.enabled=true"),
    "cert-manager-issuer": (
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.issuerRef.kind=ClusterIssuer",
        "--set",
        "certManager.issuerRef.name=corp-ca",
    ),
    "no-crds": ("--set", "crds.enabled=false"),
    "fail-closed": ("--set", "webhook.failurePolicy=Fail"),
    "selected-namespaces": ("--set", "webhook.namespaceSelector.matchLabels.llmroute\\.dev/injection=enabled"),
}
Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=60, check=False)


@cache
def render(*args: str) -> list[Manifest]:
    result = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBERNETES_VERSION, *args
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[m['metadata']['name'] for m in found]}"
    return found[0]


def container(deployment: Manifest) -> Manifest:
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(deployment: Manifest) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(deployment)["env"]}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def test_helm_lint_passes_strict() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_manifest_is_valid_kubernetes(variant: str) -> None:
    manifests = render(*VARIANTS[variant])
    for manifest in manifests:
        if manifest["kind"] in NOT_IN_KUBERNETES:
            assert manifest["apiVersion"] == "cert-manager.io/v1"
            continue
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    namespaced = [
        m
        for m in manifests
        if m["kind"]
        not in {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "MutatingWebhookConfiguration"}
    ]
    assert all(m["metadata"]["namespace"] == NAMESPACE for m in namespaced)


def test_every_resource_carries_the_standard_labels() -> None:
    for manifest in render():
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, manifest["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "llmroute"
        assert labels["helm.sh/chart"] == "llmroute-0.1.0"


def test_chart_installs_the_generated_crd_and_keeps_it_on_uninstall() -> None:
    rendered = only(render(), "CustomResourceDefinition")
    generated = crdgen.build_crd()
    assert rendered["spec"] == generated["spec"]
    assert rendered["metadata"]["name"] == generated["metadata"]["name"]
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not [m for m in render("--set", "crds.enabled=false") if m["kind"] == "CustomResourceDefinition"]
    assert not (CHART / "crds").exists(), "a crds/ folder cannot be switched off by crds.enabled"


def test_selectors_match_exactly_their_own_pods() -> None:
    manifests = render()
    deployments = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "Deployment"}
    assert set(deployments) == {"llmroute-operator", "llmroute-webhook"}
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for name, deployment in deployments.items():
        assert selects(deployment["spec"]["selector"], pods[name])
        others = [other for other in pods if other != name]
        assert not any(selects(deployment["spec"]["selector"], pods[other]) for other in others)
    for service in [m for m in manifests if m["kind"] == "Service"]:
        chosen = [n for n, labels in pods.items() if selects({"matchLabels": service["spec"]["selector"]}, labels)]
        assert chosen == ["llmroute-webhook"], service["metadata"]["name"]
    budget = only(manifests, "PodDisruptionBudget")
    assert [n for n, labels in pods.items() if selects(budget["spec"]["selector"], labels)] == ["llmroute-webhook"]
    assert budget["spec"]["minAvailable"] == 1


def test_webhook_reaches_the_server_through_service_and_ports() -> None:
    manifests = render()
    configuration = only(manifests, "MutatingWebhookConfiguration")
    [hook] = configuration["webhooks"]
    reference = hook["clientConfig"]["service"]
    service = only(manifests, "Service", "-webhook")
    deployment = only(manifests, "Deployment", "-webhook")
    assert (reference["name"], reference["namespace"]) == (service["metadata"]["name"], NAMESPACE)
    assert reference["path"] == "/mutate-pods"
    [port] = [p for p in service["spec"]["ports"] if p["port"] == reference["port"]]
    assert port["port"] == 443
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports[port["targetPort"]] == 8443 == int(env(deployment)["LLMROUTE_WEBHOOK_PORT"])
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    assert mounts["tls"] == env(deployment)["LLMROUTE_WEBHOOK_TLS_DIR"] == "/etc/llmroute/tls"
    [tls] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert {item["path"] for item in tls["secret"]["items"]} == {"tls.crt", "tls.key"}
    assert tls["secret"]["secretName"] == only(manifests, "Secret", "-webhook-tls")["metadata"]["name"]


def test_status_relay_url_reaches_the_relay_port() -> None:
    manifests = render()
    relay = only(manifests, "Service", "-relay")
    assert relay["metadata"]["name"] == f"{RELEASE}-relay" and relay["spec"]["type"] == "ClusterIP"
    deployment = only(manifests, "Deployment", "-webhook")
    url = env(deployment)["LLMROUTE_STATUS_RELAY"]
    assert url == f"http://{RELEASE}-relay.{NAMESPACE}.svc:8080"
    port_number = int(url.rsplit(":", 1)[1])
    [port] = [p for p in relay["spec"]["ports"] if p["port"] == port_number]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports[port["targetPort"]] == 8080 == int(env(deployment)["LLMROUTE_RELAY_PORT"])
    assert env(only(manifests, "Deployment", "-operator"))["LLMROUTE_STATUS_RELAY"] == url


def test_webhook_admission_settings() -> None:
    [hook] = only(render(), "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] == 5
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    [fail] = only(render("--set", "webhook.failurePolicy=Fail"), "MutatingWebhookConfiguration")["webhooks"]
    assert fail["failurePolicy"] == "Fail"


def test_webhook_skips_system_namespaces_and_llmroutes_own_pods() -> None:
    manifests = render()
    [hook] = only(manifests, "MutatingWebhookConfiguration")["webhooks"]
    for namespace in ["kube-system", "kube-public", "kube-node-lease", NAMESPACE]:
        assert not selects(hook["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}), namespace
    assert selects(hook["namespaceSelector"], {"kubernetes.io/metadata.name": "my-app"})
    for deployment in [m for m in manifests if m["kind"] == "Deployment"]:
        assert not selects(hook["objectSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert selects(hook["objectSelector"], {"app.kubernetes.io/name": "support-bot"})
    assert selects(hook["objectSelector"], {})

    [labelled] = only(render(*VARIANTS["selected-namespaces"]), "MutatingWebhookConfiguration")["webhooks"]
    assert not selects(labelled["namespaceSelector"], {"kubernetes.io/metadata.name": "my-app"})
    assert selects(
        labelled["namespaceSelector"], {"kubernetes.io/metadata.name": "my-app", "llmroute.dev/injection": "enabled"}
    )
    assert not selects(
        labelled["namespaceSelector"],
        {"kubernetes.io/metadata.name": "kube-system", "llmroute.dev/injection": "enabled"},
    )


def _verify(certificate: x509.Certificate, issuer: x509.Certificate) -> None:
    public_key = issuer.public_key()
    signature_hash = certificate.signature_hash_algorithm
    assert signature_hash is not None
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(certificate.signature, certificate.tbs_certificate_bytes, padding.PKCS1v15(), signature_hash)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(signature_hash))
    else:  # pragma: no cover - helm's genCA makes RSA keys
        raise AssertionError(f"unexpected key type {type(public_key)}")


def test_self_signed_tls_ca_bundle_signed_the_serving_certificate() -> None:
    manifests = render()
    secret = only(manifests, "Secret", "-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    [hook] = only(manifests, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    serving = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    _verify(serving, ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{RELEASE}-webhook.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    assert b"PRIVATE KEY" in base64.b64decode(secret["data"]["tls.key"])


def test_cert_manager_issues_the_certificate_and_injects_the_ca() -> None:
    manifests = render(*VARIANTS["cert-manager"])
    assert not [m for m in manifests if m["kind"] == "Secret"]
    certificate = only(manifests, "Certificate")
    issuer = only(manifests, "Issuer")
    assert certificate["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}
    assert certificate["spec"]["secretName"] == f"{RELEASE}-webhook-tls"
    assert f"{RELEASE}-webhook.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    configuration = only(manifests, "MutatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    )
    assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]

    external = render(*VARIANTS["cert-manager-issuer"])
    assert not [m for m in external if m["kind"] == "Issuer"]
    assert only(external, "Certificate")["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "corp-ca"}


def test_pods_run_under_the_restricted_pod_security_standard() -> None:
    for deployment in [m for m in render() if m["kind"] == "Deployment"]:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsUser"] == 65532
        assert "hostNetwork" not in pod and "hostPID" not in pod
        for item in pod["containers"] + pod.get("initContainers", []):
            context = item["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert not context.get("privileged")
            assert item["resources"]["requests"] and item["resources"]["limits"]["memory"]
            assert item["livenessProbe"] and item["readinessProbe"]


def test_operator_and_webhook_deployments() -> None:
    manifests = render()
    operator = only(manifests, "Deployment", "-operator")
    webhook = only(manifests, "Deployment", "-webhook")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}  # never two standalone kopf operators
    assert container(operator)["args"][0] == "operator"
    assert webhook["spec"]["replicas"] == 2
    assert container(webhook)["args"][0] == "webhook"
    for deployment in (operator, webhook):
        image = container(deployment)["image"]
        assert image == "ghcr.io/llmroute/llmroute:0.1.0"
        values = env(deployment)
        assert values["LLMROUTE_SIDECAR_IMAGE"] == image
        assert values["LLMROUTE_UNKNOWN_POLICY"] == "refuse"
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == deployment["metadata"]["name"]
    operator_ports = {p["name"]: p["containerPort"] for p in container(operator)["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        check = container(operator)[probe]["httpGet"]
        assert (check["path"], operator_ports[check["port"]]) == ("/healthz", 8081)
    assert env(operator)["LLMROUTE_HEALTH_PORT"] == "8081"
    webhook_ports = {p["name"]: p["containerPort"] for p in container(webhook)["ports"]}
    ready = container(webhook)["readinessProbe"]["httpGet"]
    assert (ready["path"], webhook_ports[ready["port"]], ready["scheme"]) == ("/readyz", 8443, "HTTPS")
    live = container(webhook)["livenessProbe"]["httpGet"]
    assert (live["path"], webhook_ports[live["port"]]) == ("/healthz", 8080)
    assert env(webhook)["LLMROUTE_SKIP_NAMESPACES"].split(",")[-1] == NAMESPACE
    assert json.loads(env(webhook)["LLMROUTE_SIDECAR_RESOURCES"])["limits"]["memory"] == "256Mi"
    assert env(webhook)["LLMROUTE_SIDECAR_IMAGE_PULL_POLICY"] == "IfNotPresent"
    tagged = render(
        "--set",
        "image.tag=1.2.3",
        "--set",
        "webhook.unknownPolicy=allow",
        "--set",
        "sidecar.image.repository=registry.example/llmroute-sidecar",
    )
    values = env(only(tagged, "Deployment", "-webhook"))
    assert container(only(tagged, "Deployment", "-webhook"))["image"] == "ghcr.io/llmroute/llmroute:1.2.3"
    assert values["LLMROUTE_SIDECAR_IMAGE"] == "registry.example/llmroute-sidecar:1.2.3"
    assert values["LLMROUTE_UNKNOWN_POLICY"] == "allow"


def test_rbac_is_least_privilege() -> None:
    manifests = render()
    roles = {m["metadata"]["name"]: m["rules"] for m in manifests if m["kind"] == "ClusterRole"}
    granted: dict[str, dict[tuple[str, str], set[str]]] = {}
    for name, rules in roles.items():
        granted[name] = {}
        for rule in rules:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (group, resource) and "*" not in rule["verbs"], name
                    granted[name].setdefault((group, resource), set()).update(rule["verbs"])
    operator = granted["llmroute-operator"]
    assert operator[("llmroute.dev", "llmroutepolicies")] == {"get", "list", "watch", "patch"}
    assert operator[("llmroute.dev", "llmroutepolicies/status")] <= {"get", "patch"}
    assert operator[("", "configmaps")] == {"get", "list", "watch", "create", "patch", "update"}
    assert operator[("", "secrets")] == {"get", "list", "watch"}
    assert operator[("", "events")] == {"create", "patch"}
    assert not any(
        verb in {"delete", "deletecollection", "escalate", "bind", "impersonate"}
        for verbs in operator.values()
        for verb in verbs
    )
    assert granted["llmroute-webhook"] == {("llmroute.dev", "llmroutepolicies"): {"get", "list"}}
    bindings = {m["roleRef"]["name"]: m["subjects"] for m in manifests if m["kind"] == "ClusterRoleBinding"}
    accounts = {m["metadata"]["name"] for m in manifests if m["kind"] == "ServiceAccount"}
    for role, subjects in bindings.items():
        assert role in roles
        assert [(s["kind"], s["namespace"]) for s in subjects] == [("ServiceAccount", NAMESPACE)]
        assert subjects[0]["name"] in accounts


@pytest.mark.parametrize(
    "values",
    [
        ("--set", "nope=1"),
        ("--set", "webhook.nope=1"),
        ("--set", "webhook.failurePolicy=Sometimes"),
        ("--set", "webhook.unknownPolicy=maybe"),
        ("--set", "image.pullPolicy=Whenever"),
    ],
    ids=["unknown-top-level-key", "unknown-nested-key", "bad-failure-policy", "bad-unknown-policy", "bad-pull-policy"],
)
def test_values_schema_rejects_what_the_chart_does_not_know(values: tuple[str, ...]) -> None:
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values)
    assert result.returncode != 0
    assert "schema" in result.stderr.lower() or "values don't meet" in result.stderr.lower(), result.stderr


def test_values_schema_closes_every_object_and_accepts_the_defaults() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8")), schema)

    def closed(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, child in node.items():
                closed(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                closed(child, f"{path}/{index}")

    closed(schema, "#")


def test_every_value_has_a_comment() -> None:
    """Each key in values.yaml has a comment right above it, or sits inside a commented block."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, covered) of the enclosing keys
    uncovered = []
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        commented = index > 0 and lines[index - 1].strip().startswith("#")
        covered = commented or any(c for _, c in stack)
        is_leaf = match.group(3).strip() not in ("",)
        if is_leaf and not covered:
            uncovered.append(match.group(2))
        stack.append((indent, covered))
    assert not uncovered, uncovered


def test_notes_example_policy_is_valid() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    body = notes.split("<<'POLICY' | kubectl -n my-app apply -f -\n", 1)[1].split("\n  POLICY\n", 1)[0]
    policy = yaml.safe_load("\n".join(line.removeprefix("  ") for line in body.splitlines()))
    assert load_policy(policy).name == "support-bot"
    assert '"llmroute.dev/policy":"support-bot"' in notes


def test_the_operator_reads_the_environment_the_chart_sets() -> None:
    """The chart's env parses with the operator's own settings reader, and ports/paths line up."""
    from llmroute_operator.settings import Settings
    from llmroute_operator.webhooks import MUTATE_PATH

    manifests = render()
    for deployment in [m for m in manifests if m["kind"] == "Deployment"]:
        settings = Settings.from_env(env(deployment))
        assert settings.status_relay == f"http://{RELEASE}-relay.{NAMESPACE}.svc:8080"
        assert settings.sidecar_image == "ghcr.io/llmroute/llmroute:0.1.0"
    webhook = Settings.from_env(env(only(manifests, "Deployment", "-webhook")))
    assert (webhook.webhook_port, webhook.relay_port, webhook.webhook_tls_dir) == (8443, 8080, "/etc/llmroute/tls")
    assert NAMESPACE in webhook.skip_namespaces and webhook.unknown_policy == "refuse"
    assert webhook.peering is None  # standalone kopf: one replica, Recreate
    assert Settings.from_env(env(only(manifests, "Deployment", "-operator"))).health_port == 8081
    [hook] = only(manifests, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["service"]["path"] == MUTATE_PATH
