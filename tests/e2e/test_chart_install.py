"""1. The chart installed with the real helm into a real API server: the CRD is accepted and
Established, `kubectl explain` shows the field descriptions, the printer columns print."""

from __future__ import annotations

import pytest
from tests.crds.apiserver import load_crd, root_schema
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import APP_NAMESPACE, CRD, RELEASE, RELEASE_NAMESPACE, Component, Release, policy_manifest

pytestmark = pytest.mark.e2e


def test_the_crd_is_accepted_and_established(release: Release) -> None:
    crd = release.cluster.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert conditions.get("NonStructuralSchema", "False") == "False"
    assert crd["status"]["acceptedNames"]["shortNames"] == ["lrp"]
    status = release.cluster.helm("status", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json")
    assert '"status":"deployed"' in status.replace(" ", "")


def test_kubectl_explain_shows_the_crds_descriptions(release: Release) -> None:
    spec = root_schema()["properties"]["spec"]
    # Established comes before the server publishes the CRD's OpenAPI schema, which explain reads.
    def explain() -> str | None:
        out = release.cluster.kubectl("explain", "llmroutepolicies.spec", check=False)
        return None if "couldn't find resource" in out else out

    explained = wait_for("kubectl explain to find the CRD's schema", explain, timeout=30, interval=0.5)
    for name, field in spec["properties"].items():
        assert name in explained
        first_words = " ".join(field["description"].split()[:4])
        assert first_words in " ".join(explained.split()), f"spec.{name}: {first_words!r} not explained"
    routes = release.cluster.kubectl("explain", "lrp.spec.routes.budget")
    budget = spec["properties"]["routes"]["items"]["properties"]["budget"]["description"]
    assert " ".join(budget.split()[:5]) in " ".join(routes.split())


def test_the_printer_columns_print(release: Release, operator: Component, app_keys: dict[str, str]) -> None:
    """Every column of the CRD heads `kubectl get`, and a reconciled policy fills Routes, Ready and Hash."""
    cluster: Cluster = release.cluster
    columns = load_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    cluster.apply(policy_manifest("columns", routes=("chat", "summarize")))
    cluster.kubectl("wait", "-n", APP_NAMESPACE, "lrp/columns", "--for=condition=Ready", "--timeout=60s")
    wide = cluster.kubectl("get", "-n", APP_NAMESPACE, "lrp", "columns", "-o", "wide").splitlines()
    header = wide[0].split()
    assert header == ["NAME", *[c["name"].upper() for c in columns]]
    row = table_row(wide[0], wide[1])
    policy = cluster.api("GET", f"/apis/llmroute.dev/v1alpha1/namespaces/{APP_NAMESPACE}/llmroutepolicies/columns")
    assert row["NAME"] == "columns"
    assert row["ROUTES"] == '["chat","summarize"]'
    assert row["READY"] == "True"
    assert row["SHEDDING"] == "", "no status page sheds"
    assert row["HASH"] == policy["status"]["configHash"]
    assert row["AGE"].endswith(("s", "m"))
    narrow = cluster.kubectl("get", "-n", APP_NAMESPACE, "lrp", "columns").splitlines()[0].split()
    assert "HASH" not in narrow, "priority-1 columns print only with -o wide"
    cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", "columns", "--wait=true", "--timeout=60s")


def table_row(header: str, line: str) -> dict[str, str]:
    """A `kubectl get` row by column: each cell starts where its heading does (cells may be empty)."""
    starts = [(name, header.index(name)) for name in header.split()]
    ends = [start for _, start in starts[1:]] + [len(line)]
    return {name: line[start:end].strip() for (name, start), end in zip(starts, ends, strict=True)}
