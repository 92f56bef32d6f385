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
NOT_IN_KUBERNETES = {
    "Issuer": "cert-manager.io/v1",
    "Certificate": "cert-manager.io/v1",
    "ClusterKopfPeering": "kopf.dev/v1",
}
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ClusterKopfPeering",
}
VARIANTS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "cert-manager": ("--set", "certManager.enabled=true"),
    "helm-tls": ("--set", "webhook.tls.mode=helm"),
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
    "operator-peering": ("--set", "operator.replicas=3"),
    "single-webhook": ("--set", "webhook.replicas=1"),
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
            assert manifest["apiVersion"] == NOT_IN_KUBERNETES[manifest["kind"]]
            continue
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    namespaced = [m for m in manifests if m["kind"] not in CLUSTER_SCOPED]
    assert all(m["metadata"]["namespace"] == NAMESPACE for m in namespaced)
    assert all("namespace" not in m["metadata"] for m in manifests if m["kind"] in CLUSTER_SCOPED)


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
    # crds/ cannot be switched off by crds.enabled: it holds only kopf's shared peering CRD, never llmroute's.
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["clusterkopfpeerings.kopf.dev.yaml"]


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


@pytest.mark.parametrize(("replicas", "min_available"), [(2, 1), (3, 2), (3, "50%"), (5, 1)])
def test_webhook_budget_always_leaves_a_pod_to_evict(replicas: int, min_available: int | str) -> None:
    manifests = render(
        "--set", f"webhook.replicas={replicas}", "--set-string" if isinstance(min_available, str) else "--set",
        f"webhook.podDisruptionBudget.minAvailable={min_available}",
    )  # fmt: skip
    assert only(manifests, "Deployment", "-webhook")["spec"]["replicas"] == replicas
    budget = only(manifests, "PodDisruptionBudget")["spec"]
    assert budget == {"minAvailable": min_available, "selector": budget["selector"]}
    allowed = (
        replicas - budget["minAvailable"]
        if isinstance(min_available, int)
        else replicas - -(-replicas * int(min_available.rstrip("%")) // 100)  # Kubernetes rounds minAvailable up
    )
    assert allowed >= 1, "a node drain could never evict a webhook pod"


def test_a_single_webhook_replica_gets_no_budget_that_would_block_drains() -> None:
    manifests = render(*VARIANTS["single-webhook"])
    assert only(manifests, "Deployment", "-webhook")["spec"]["replicas"] == 1
    assert not [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    assert not [
        m for m in render("--set", "webhook.podDisruptionBudget.enabled=false") if m["kind"] == "PodDisruptionBudget"
    ]


@pytest.mark.parametrize(
    "values",
    [
        ("--set", "webhook.replicas=2", "--set", "webhook.podDisruptionBudget.minAvailable=2"),
        ("--set", "webhook.replicas=3", "--set", "webhook.podDisruptionBudget.minAvailable=5"),
        ("--set", "webhook.podDisruptionBudget.minAvailable=100%"),
        ("--set", "webhook.podDisruptionBudget.minAvailable=0"),
    ],
    ids=["min-equals-replicas", "min-above-replicas", "hundred-percent", "zero"],
)
def test_a_budget_that_blocks_drains_or_protects_nothing_is_refused(values: tuple[str, ...]) -> None:
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values)
    assert result.returncode != 0
    assert "minAvailable" in result.stderr, result.stderr


@pytest.mark.parametrize(("values", "listening"), [((), 8443), (("--set", "webhook.port=10250"), 10250)])
def test_webhook_reaches_the_server_through_service_and_ports(values: tuple[str, ...], listening: int) -> None:
    """webhook.port=10250: private GKE control planes reach nodes on 443 and 10250 only."""
    manifests = render(*values)
    configuration = only(manifests, "MutatingWebhookConfiguration")
    service = only(manifests, "Service", "-webhook")
    deployment = only(manifests, "Deployment", "-webhook")
    assert len(configuration["webhooks"]) == 2
    for hook in configuration["webhooks"]:
        reference = hook["clientConfig"]["service"]
        assert (reference["name"], reference["namespace"]) == (service["metadata"]["name"], NAMESPACE)
        assert reference["path"] == "/mutate-pods"
        [port] = [p for p in service["spec"]["ports"] if p["port"] == reference["port"]]
        assert port["port"] == 443
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert ports[port["targetPort"]] == listening == int(env(deployment)["LLMROUTE_WEBHOOK_PORT"])
    ready = container(deployment)["readinessProbe"]["httpGet"]
    assert {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}[ready["port"]] == listening
    # webhook.tls.mode=operator (default): the webhook writes its pair into its own writable directory.
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    assert "tls" not in mounts and env(deployment)["LLMROUTE_WEBHOOK_TLS_DIR"].startswith(mounts["tmp"] + "/")


@pytest.mark.parametrize("variant", ["helm-tls", "cert-manager"])
def test_webhook_mounts_the_tls_secret_helm_or_cert_manager_fill(variant: str) -> None:
    manifests = render(*VARIANTS[variant])
    deployment = only(manifests, "Deployment", "-webhook")
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    assert mounts["tls"] == env(deployment)["LLMROUTE_WEBHOOK_TLS_DIR"] == "/etc/llmroute/tls"
    assert "LLMROUTE_WEBHOOK_TLS_SECRET" not in env(deployment)
    [tls] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert {item["path"] for item in tls["secret"]["items"]} == {"tls.crt", "tls.key"}
    assert tls["secret"]["secretName"] == f"{RELEASE}-webhook-tls"


def test_default_tls_renders_no_key_material_and_the_same_output_every_time() -> None:
    """webhook.tls.mode=operator: two renders (an Argo CD sync each) are identical; the webhook makes the
    CA and leaf into an empty Secret and sets the caBundle itself, for the names of its Service."""
    from llmroute_operator.settings import Settings

    def template() -> str:
        result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBERNETES_VERSION)
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = template()
    assert template() == first
    assert "PRIVATE KEY" not in first and "BEGIN CERTIFICATE" not in first
    manifests = render()
    secret = only(manifests, "Secret", "-webhook-certs")
    assert secret["type"] == "Opaque" and "data" not in secret and "stringData" not in secret
    configuration = only(manifests, "MutatingWebhookConfiguration")
    assert all("caBundle" not in hook["clientConfig"] for hook in configuration["webhooks"])
    assert "annotations" not in configuration["metadata"]
    settings = Settings.from_env(env(only(manifests, "Deployment", "-webhook")))
    assert settings.webhook_tls_secret == f"{NAMESPACE}/{secret['metadata']['name']}"
    assert settings.webhook_configuration == configuration["metadata"]["name"]
    service = only(manifests, "Service", "-webhook")["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in settings.webhook_dns_names  # the name the API server verifies
    # The same names as the certificate helm mode generates.
    helm_secret = only(render(*VARIANTS["helm-tls"]), "Secret", "-webhook-tls")
    serving = x509.load_pem_x509_certificate(base64.b64decode(helm_secret["data"]["tls.crt"]))
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted(settings.webhook_dns_names)


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
    hooks = only(render(), "MutatingWebhookConfiguration")["webhooks"]
    assert [h["name"] for h in hooks] == ["namespaces.pods.llmroute.dev", "objects.pods.llmroute.dev"]
    hook = hooks[0]
    assert all({**h, "name": "", "namespaceSelector": {}, "objectSelector": {}} == {
        **hook, "name": "", "namespaceSelector": {}, "objectSelector": {}} for h in hooks)  # fmt: skip
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
    fail = only(render("--set", "webhook.failurePolicy=Fail"), "MutatingWebhookConfiguration")["webhooks"]
    assert {h["failurePolicy"] for h in fail} == {"Fail"}


def sent_by(hooks: list[Manifest], namespace: dict[str, str], pod: dict[str, str]) -> list[str]:
    """The webhooks the API server calls for a pod with these labels in a namespace with these labels."""
    return [
        h["name"] for h in hooks if selects(h["namespaceSelector"], namespace) and selects(h["objectSelector"], pod)
    ]


def ns(name: str, injection: str | None = None) -> dict[str, str]:
    """A namespace's labels: its name, and llmroute.dev/injection when given."""
    return {"kubernetes.io/metadata.name": name, **({"llmroute.dev/injection": injection} if injection else {})}


def test_only_opted_in_pods_are_sent_to_the_webhook_and_each_at_most_once() -> None:
    """Opt-in by label (Istio's pattern): CNI, DNS, mesh and every other pod never wait on the webhook."""
    hooks = only(render(), "MutatingWebhookConfiguration")["webhooks"]
    opted_in, opted_out = {"llmroute.dev/inject": "true"}, {"llmroute.dev/inject": "false"}
    enabled, disabled = {"llmroute.dev/injection": "enabled"}, {"llmroute.dev/injection": "disabled"}

    assert sent_by(hooks, ns("my-app"), {"app": "web"}) == []
    assert sent_by(hooks, ns("my-app"), opted_in) == ["objects.pods.llmroute.dev"]
    assert sent_by(hooks, {**ns("my-app"), **enabled}, {"app": "web"}) == ["namespaces.pods.llmroute.dev"]
    assert sent_by(hooks, {**ns("my-app"), **enabled}, opted_in) == ["namespaces.pods.llmroute.dev"]
    assert sent_by(hooks, {**ns("my-app"), **enabled}, opted_out) == []
    assert sent_by(hooks, {**ns("my-app"), **disabled}, opted_in) == []
    for system in ["kube-system", "kube-public", "kube-node-lease", NAMESPACE]:
        assert sent_by(hooks, {**ns(system), **enabled}, opted_in) == [], system
    for deployment in [m for m in render() if m["kind"] == "Deployment"]:
        labels = {**deployment["spec"]["template"]["metadata"]["labels"], **opted_in}
        assert sent_by(hooks, {**ns("my-app"), **enabled}, labels) == []

    every = only(render("--set", "webhook.selection=all"), "MutatingWebhookConfiguration")["webhooks"]
    assert sent_by(every, ns("my-app"), {"app": "web"}) == ["pods.llmroute.dev"]
    assert sent_by(every, ns("kube-system"), {"app": "web"}) == []


def test_webhook_skips_system_namespaces_and_llmroutes_own_pods() -> None:
    manifests = render("--set", "webhook.selection=all")
    [hook] = only(manifests, "MutatingWebhookConfiguration")["webhooks"]
    for namespace in ["kube-system", "kube-public", "kube-node-lease", NAMESPACE]:
        assert not selects(hook["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}), namespace
    assert selects(hook["namespaceSelector"], {"kubernetes.io/metadata.name": "my-app"})
    for deployment in [m for m in manifests if m["kind"] == "Deployment"]:
        assert not selects(hook["objectSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert selects(hook["objectSelector"], {"app.kubernetes.io/name": "support-bot"})
    assert selects(hook["objectSelector"], {})

    hooks = only(render(*VARIANTS["selected-namespaces"]), "MutatingWebhookConfiguration")["webhooks"]
    pod = {"llmroute.dev/inject": "true"}
    assert sent_by(hooks, ns("my-app"), pod) == []
    assert sent_by(hooks, ns("my-app", "enabled"), pod) == ["namespaces.pods.llmroute.dev"]
    assert sent_by(hooks, ns("kube-system", "enabled"), pod) == []


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
    manifests = render(*VARIANTS["helm-tls"])
    secret = only(manifests, "Secret", "-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    for hook in only(manifests, "MutatingWebhookConfiguration")["webhooks"]:
        assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    serving = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    _verify(serving, ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{RELEASE}-webhook.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    assert b"PRIVATE KEY" in base64.b64decode(secret["data"]["tls.key"])


def _hours(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours + minutes / 60 + seconds / 3600


def test_cert_manager_issues_the_certificate_from_a_ca_that_outlives_it() -> None:
    """Self-signed Issuer -> 10-year CA Certificate -> CA Issuer -> serving Certificate, renewed well before
    expiry; the injected caBundle (the leaf Secret's ca.crt: the CA) survives every leaf renewal."""
    manifests = render(*VARIANTS["cert-manager"])
    assert not [m for m in manifests if m["kind"] == "Secret"]
    issuers = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "Issuer"}
    certificates = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "Certificate"}
    assert issuers == {
        f"{RELEASE}-selfsigned": {"selfSigned": {}},
        f"{RELEASE}-ca": {"ca": {"secretName": f"{RELEASE}-webhook-ca"}},
    }
    ca, leaf = certificates[f"{RELEASE}-webhook-ca"], certificates[f"{RELEASE}-webhook"]
    assert ca["isCA"] is True and ca["secretName"] == f"{RELEASE}-webhook-ca"
    assert ca["issuerRef"] == {"kind": "Issuer", "name": f"{RELEASE}-selfsigned"}
    assert leaf["issuerRef"] == {"kind": "Issuer", "name": f"{RELEASE}-ca"}
    assert not leaf.get("isCA")
    assert leaf["secretName"] == f"{RELEASE}-webhook-tls"
    assert f"{RELEASE}-webhook.{NAMESPACE}.svc" in leaf["dnsNames"]
    assert _hours(ca["duration"]) >= 10 * _hours(leaf["duration"])  # the CA outlives many leaves
    assert 0 < _hours(leaf["renewBefore"]) < _hours(leaf["duration"])  # rotated before it expires
    configuration = only(manifests, "MutatingWebhookConfiguration")
    assert (
        configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{RELEASE}-webhook"
    )
    assert all("caBundle" not in hook["clientConfig"] for hook in configuration["webhooks"])

    external = render(*VARIANTS["cert-manager-issuer"])
    assert not [m for m in external if m["kind"] == "Issuer"]
    assert [m["metadata"]["name"] for m in external if m["kind"] == "Certificate"] == [f"{RELEASE}-webhook"]
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
    assert json.loads(env(webhook)["LLMROUTE_SIDECAR_RESOURCES"])["limits"]["memory"] == "384Mi"
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
    roles = {m["metadata"]["name"]: m["rules"] for m in manifests if m["kind"] in ("ClusterRole", "Role")}
    granted: dict[str, dict[tuple[str, str], set[str]]] = {}
    for name, rules in roles.items():
        granted[name] = {}
        for rule in rules:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (group, resource) and "*" not in rule["verbs"], name
                    granted[name].setdefault((group, resource), set()).update(rule["verbs"])
    # Exactly what the code calls, nothing more: kopf lists, watches and merge-patches the policies and
    # their status and creates core/v1 Events; kubeapi.py gets, creates and merge-patches ConfigMaps and
    # only gets Secrets (never list/watch: the operator must not be able to read every Secret).
    assert granted["llmroute-operator"] == {
        ("llmroute.dev", "llmroutepolicies"): {"get", "list", "watch", "patch"},
        ("llmroute.dev", "llmroutepolicies/status"): {"patch"},
        ("llmroute.dev", "llmroutepolicies/finalizers"): {"update"},  # blockOwnerDeletion (OpenShift)
        ("", "configmaps"): {"get", "list", "create", "patch"},
        ("", "pods"): {"list"},  # opted-in pods without the sidecar (UninjectedPods)
        ("", "namespaces"): {"list"},
        ("", "secrets"): {"get"},
        ("", "events"): {"create"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    }
    assert all("resourceNames" not in rule for rule in roles["llmroute-operator"])
    assert granted["llmroute-webhook"] == {
        ("llmroute.dev", "llmroutepolicies"): {"list", "watch"},  # the informer: no read per admission
        ("", "events"): {"create"},  # InjectedLastGoodConfig
        # webhook.tls.mode=operator: its own configuration's caBundle, by name
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): {"get", "patch"},
    }
    [caBundle] = [rule for rule in roles["llmroute-webhook"] if "resourceNames" in rule]
    assert caBundle["resourceNames"] == [only(manifests, "MutatingWebhookConfiguration")["metadata"]["name"]]
    # Its own TLS Secret, by name, in its own namespace (a Role): read and merge-patch, no create or list.
    [role] = [m for m in manifests if m["kind"] == "Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [f"{RELEASE}-webhook-certs"],
         "verbs": ["get", "patch"]}
    ]  # fmt: skip
    [role_binding] = [m for m in manifests if m["kind"] == "RoleBinding"]
    assert role_binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-webhook", "namespace": NAMESPACE}
    ]
    for variant in ("helm-tls", "cert-manager"):  # nothing of it in the other modes
        other = render(*VARIANTS[variant])
        assert not [m for m in other if m["kind"] in ("Role", "RoleBinding")]
        [webhook_role] = [
            m for m in other if m["kind"] == "ClusterRole" and m["metadata"]["name"] == "llmroute-webhook"
        ]
        assert all("mutatingwebhookconfigurations" not in rule["resources"] for rule in webhook_role["rules"])
    # Aggregated into Kubernetes' own view/edit/admin roles, bound to nobody by the chart.
    assert granted["llmroute-view"] == {
        ("llmroute.dev", "llmroutepolicies"): {"get", "list", "watch"},
        ("llmroute.dev", "llmroutepolicies/status"): {"get", "list", "watch"},
    }
    assert granted["llmroute-edit"] == {
        ("llmroute.dev", "llmroutepolicies"): {
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        }
    }
    labels = {m["metadata"]["name"]: m["metadata"]["labels"] for m in manifests if m["kind"] == "ClusterRole"}
    assert labels["llmroute-view"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert labels["llmroute-edit"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["llmroute-edit"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    bindings = {m["roleRef"]["name"]: m["subjects"] for m in manifests if m["kind"] == "ClusterRoleBinding"}
    assert set(bindings) == {"llmroute-operator", "llmroute-webhook"}
    accounts = {m["metadata"]["name"] for m in manifests if m["kind"] == "ServiceAccount"}
    for role, subjects in bindings.items():
        assert role in roles
        assert [(s["kind"], s["namespace"]) for s in subjects] == [("ServiceAccount", NAMESPACE)]
        assert subjects[0]["name"] in accounts


KOPF_NEEDS = {  # kopf's own calls for a cluster-wide operator of llmroutepolicies (kopf docs: "Deployment")
    ("llmroute.dev", "llmroutepolicies"): {"list", "watch", "patch"},  # watch-stream; finalizer, annotations
    ("llmroute.dev", "llmroutepolicies/status"): {"patch"},  # status subresource
    # not a call: owner references with blockOwnerDeletion need it under OwnerReferencesPermissionEnforcement
    ("llmroute.dev", "llmroutepolicies/finalizers"): {"update"},
    ("", "events"): {"create"},  # kopf.event/kopf.warn post core/v1 Events
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},  # notices its CRD appear
}
CLIENT_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch", "replace": "update"}
CLIENT_RESOURCES = {
    "config_map": ("", "configmaps"),
    "secret": ("", "secrets"),
    "event": ("", "events"),
    "pod": ("", "pods"),
    "namespace": ("", "namespaces"),
    "mutating_webhook_configuration": ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
}


def _code_grants(*modules: str, served_elsewhere: frozenset[str] = frozenset()) -> dict[tuple[str, str], set[str]]:
    """(group, resource) -> verbs that the named operator modules call through KubeApi (kubeapi.py);
    calls named in `served_elsewhere` are left out (answered by something else in production)."""
    import ast

    from llmroute_operator import GROUP, PLURAL

    source = ROOT / "operator" / "llmroute_operator"
    calls: dict[str, set[tuple[tuple[str, str], str]]] = {}
    [api] = [n for n in ast.walk(ast.parse((source / "kubeapi.py").read_text())) if getattr(n, "name", "") == "KubeApi"]
    for method in [n for n in ast.walk(api) if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)]:
        calls[method.name] = set()
        for node in ast.walk(method):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                if node.value.attr not in ("_core", "_custom", "_admission"):
                    continue
                match = re.fullmatch(r"([a-z]+)_(?:namespaced_|cluster_)?(\w+?)(?:_for_all_namespaces)?", node.attr)
                assert match and match.group(1) in CLIENT_VERBS, node.attr
                custom = {"custom_object": (GROUP, PLURAL), "custom_object_status": (GROUP, f"{PLURAL}/status")}
                resource = custom.get(match.group(2)) or CLIENT_RESOURCES[match.group(2)]
                verb = CLIENT_VERBS[match.group(1)]
                calls[method.name].add((resource, "watch" if method.name.startswith("watch_") else verb))
    grants: dict[tuple[str, str], set[str]] = {}
    for module in modules:
        for node in ast.walk(ast.parse((source / module).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in calls
                and node.func.attr not in served_elsewhere
            ):
                for resource, verb in calls[node.func.attr]:
                    grants.setdefault(resource, set()).add(verb)
    return grants


def test_no_access_to_secrets_when_the_operator_does_not_check_them() -> None:
    manifests = render("--set", "operator.checkSecrets=false")
    [role] = [m for m in manifests if m["kind"] == "ClusterRole" and m["metadata"]["name"] == "llmroute-operator"]
    assert not [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    from llmroute_operator.settings import Settings

    assert Settings.from_env(env(only(manifests, "Deployment", "-operator"))).check_secrets is False
    assert Settings.from_env(env(only(render(), "Deployment", "-operator"))).check_secrets is True
    assert not [
        m
        for m in render("--set", "rbac.aggregateToDefaultRoles=false")
        if m["metadata"]["name"].endswith(("-view", "-edit"))
    ]


def test_rbac_is_exactly_what_the_code_calls() -> None:
    """The operator's grants are kopf's needs plus the KubeApi calls its handlers make; the webhook's are
    the KubeApi calls the admission server and relay make. A new call fails here until RBAC has it, and
    a grant no code uses fails here too."""
    roles = {m["metadata"]["name"]: m["rules"] for m in render() if m["kind"] in ("ClusterRole", "Role")}

    def granted(role: str) -> dict[tuple[str, str], set[str]]:
        found: dict[tuple[str, str], set[str]] = {}
        for rule in roles[role]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    found.setdefault((group, resource), set()).update(rule["verbs"])
        return found

    operator = {key: set(verbs) for key, verbs in KOPF_NEEDS.items()}
    for key, verbs in _code_grants("handlers.py", "reconcile.py").items():
        operator.setdefault(key, set()).update(verbs)
    assert granted("llmroute-operator") == operator
    # The webhook's PolicySource is the informer in production (webhooks._main): its read_policy and
    # list_policies answer from memory; only the informer's list and watch reach the API.
    policy_source = frozenset({"read_policy", "list_policies"})
    # Its Role (its own TLS Secret) and ClusterRole together: webhook.tls.mode=operator's keeper included.
    webhook = granted("llmroute-webhook") | granted("llmroute-webhook-certs")
    assert webhook == _code_grants("webhooks.py", served_elsewhere=policy_source) | _code_grants(
        "informer.py"
    ) | _code_grants("tls_keeper.py")


def test_one_operator_replica_runs_standalone_and_is_recreated() -> None:
    from llmroute_operator.handlers import operator_options
    from llmroute_operator.settings import Settings

    manifests = render()
    operator = only(manifests, "Deployment", "-operator")
    assert operator["spec"]["replicas"] == 1 and operator["spec"]["strategy"] == {"type": "Recreate"}
    assert "LLMROUTE_PEERING" not in env(operator)
    assert operator_options(Settings.from_env(env(operator)))["standalone"] is True
    assert not [m for m in manifests if m["apiVersion"].startswith("kopf.dev/")]


def test_operator_replicas_peer_through_kopfs_cluster_peering() -> None:
    """Several reconcilers: the operator is started with a peering name, the ClusterKopfPeering of that
    name exists (its CRD is kopf's own, from the chart's crds/), and RBAC lets kopf see peers and
    keep itself alive there, and nothing more."""
    from kopf._cogs.structs import references  # kopf's own names for its peering resources

    from llmroute_operator.handlers import operator_options
    from llmroute_operator.settings import Settings

    manifests = render(*VARIANTS["operator-peering"])
    operator = only(manifests, "Deployment", "-operator")
    assert operator["spec"]["replicas"] == 3
    assert operator["spec"]["strategy"]["type"] == "RollingUpdate"  # peers pause instead of overlapping
    peering = only(manifests, "ClusterKopfPeering")
    name = peering["metadata"]["name"]
    assert name == RELEASE and "namespace" not in peering["metadata"]
    options = operator_options(Settings.from_env(env(operator)))
    assert (options["standalone"], options["peering_name"], options["clusterwide"]) == (False, name, True)

    crd = yaml.safe_load((CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml").read_text(encoding="utf-8"))
    kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    [version] = crd["spec"]["versions"]
    names = crd["spec"]["names"]
    served = references.Resource(
        group=crd["spec"]["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
        singular=names["singular"], namespaced=False, verbs=frozenset({"list", "watch", "patch"}),
    )  # fmt: skip
    assert references.CLUSTER_PEERINGS_K.check(served)  # the resource kopf looks for in cluster-wide peering
    assert peering["apiVersion"] == f"{served.group}/{served.version}"
    assert crd["spec"]["scope"] == "Cluster" and names["kind"] == peering["kind"]

    [role] = [m for m in manifests if m["kind"] == "ClusterRole" and m["metadata"]["name"] == "llmroute-operator"]
    peering_rules = [r for r in role["rules"] if r["apiGroups"] == ["kopf.dev"]]
    assert peering_rules == [
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["list", "watch"]},
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "resourceNames": [name], "verbs": ["patch"]},
    ]
    assert [r for r in role["rules"] if r["apiGroups"] != ["kopf.dev"]] == only(render(), "ClusterRole", "-operator")[
        "rules"
    ]


def test_operator_peering_refuses_a_namespaced_operator() -> None:
    result = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--set", "operator.replicas=2", "--set", "operator.extraArgs={--namespace,my-app}",
    )  # fmt: skip
    assert result.returncode != 0 and "ClusterKopfPeering" in result.stderr, result.stderr
    assert render("--set", "operator.extraArgs={--namespace,my-app}")  # one replica: fine


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
    for bad in ({"operator": {"replicas": 0}}, {"webhook": {"replicas": 0}}, {"operator": {"replicas": "2"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


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
    assert (webhook.webhook_port, webhook.relay_port, webhook.webhook_tls_dir) == (8443, 8080, "/tmp/tls")
    assert NAMESPACE in webhook.skip_namespaces and webhook.unknown_policy == "refuse"
    assert webhook.peering is None  # standalone kopf: one replica, Recreate
    assert Settings.from_env(env(only(manifests, "Deployment", "-operator"))).health_port == 8081
    for hook in only(manifests, "MutatingWebhookConfiguration")["webhooks"]:
        assert hook["clientConfig"]["service"]["path"] == MUTATE_PATH


def test_install_steps_agree_in_readme_notes_and_the_e2e_script() -> None:
    """One way to install (the chart owns the CRD), one way to ask for the sidecar (on the pod template)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    kubernetes = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    notes = (CHART / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    script = (ROOT / "tests" / "e2e" / "kind.sh").read_text(encoding="utf-8")
    patch = (
        """'{"spec":{"template":{"metadata":{"labels":{"llmroute.dev/inject":"true"},"""
        """"annotations":{"llmroute.dev/policy":"support-bot"}}}}}'"""
    )
    for name, text in {"README": kubernetes, "NOTES.txt": notes, "kind.sh": script}.items():
        assert re.search(r"patch deployment my-app --type merge -p \\\s+" + re.escape(patch), text), name
        assert "kubectl annotate deployment" not in text, name  # would annotate the Deployment, not its pods
    # The chart installs the CRD (crds.enabled=true): applying crds/ first makes Helm refuse to adopt it.
    [steps] = re.findall(r"```bash\n(.*?)```", kubernetes, re.DOTALL)
    for name, text in {"README": steps, "kind.sh": script}.items():
        commands = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert any(c.startswith(("helm install", "helm upgrade --install")) for c in commands), name
        assert not [c for c in commands if "apply -f crds" in c], name
    assert "crds.enabled=false" not in script
    assert "examples/deployment.yaml" not in script  # its image is illustrative, not pullable


def test_webhook_url_points_the_configuration_out_of_the_cluster_for_testing() -> None:
    """`webhook.url` (make e2e): the API server calls that URL, with the chart's caBundle (helm mode: the
    default operator mode refuses it, its certificate names the Service only); https only."""
    url = "https://127.0.0.1:9443/mutate-pods"
    hooks = only(render("--set", f"webhook.url={url}", *VARIANTS["helm-tls"]), "MutatingWebhookConfiguration")
    assert len(hooks["webhooks"]) == 2  # webhook.selection=labels: by namespace label and by pod label
    for hook in hooks["webhooks"]:
        assert hook["clientConfig"]["url"] == url and "service" not in hook["clientConfig"]
        assert hook["clientConfig"]["caBundle"]
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", f"webhook.url={url}")
    assert result.returncode != 0 and "needs webhook.tls.mode=helm" in result.stderr, result.stderr
    for refused in ("http://127.0.0.1:9443/mutate-pods", "https://", "127.0.0.1:9443"):
        result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", f"webhook.url={refused}")
        assert result.returncode != 0 and "/webhook/url" in result.stderr, (refused, result.stderr)
