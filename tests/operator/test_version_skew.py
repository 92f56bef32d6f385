"""Version skew: operator N with sidecars N-1 (the skew policy in charts/llmroute/README.md).

After an upgrade the new operator rewrites every ConfigMap, and any sidecar of the previous release that
restarts reads it. The previous release's sidecar, refusing fields it does not know, must still load what
the new operator writes: the operator writes only values that differ from the defaults, and the sidecar
tolerates unknown fields in an operator-rendered config (with a warning) from now on.

The previous release's sidecar is the real one: its package is extracted from git (`PREVIOUS_RELEASE`)
into a temporary directory and run as a subprocess (`python -m llmroute_sidecar.cli sidecar`) on loopback.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmroute_operator.reconcile import CONFIG_KEY, build_configmap
from llmroute_sidecar.policy import RENDERED_ANNOTATION, load_policy, render_sidecar_config

from .conftest import policy_body
from .sidecar_process import get, running_sidecar, sidecar_environment

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS_RELEASE = "08c4f4d"
"""The last commit before the skew policy (README figures of the final bench run); move it forward at
each release so the test always runs the release before this code."""


@pytest.fixture(scope="module")
def previous_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose `llmroute_sidecar` package is the previous release's."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS_RELEASE, "sidecar/llmroute_sidecar"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:  # a shallow clone has no history to take the previous release from
        pytest.skip(f"git cannot read {PREVIOUS_RELEASE}: {archive.stderr.decode(errors='replace').strip()}")
    target = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target / "sidecar"


def readiness(package_dir: Path, policy_file: Path) -> tuple[int, str]:
    with running_sidecar(policy_file, package_dir=package_dir) as sidecar:
        return get(f"{sidecar.url}/readyz")


def example_policy() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "cluster-policy.yaml").read_text())
    document["metadata"]["namespace"] = "apps"
    return document


def test_the_previous_package_is_what_the_subprocess_imports(previous_sidecar: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import llmroute_sidecar; print(llmroute_sidecar.__file__)"],
        env=sidecar_environment(previous_sidecar, {}), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert Path(found.stdout.strip()).is_relative_to(previous_sidecar)


@pytest.mark.parametrize("document", [policy_body(), example_policy()], ids=["minimal", "example"])
def test_the_previous_sidecar_runs_what_the_new_operator_writes(
    previous_sidecar: Path, tmp_path: Path, document: dict[str, Any]
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(build_configmap(document)["data"][CONFIG_KEY])

    status, text = readiness(previous_sidecar, policy_file)

    assert (status, text) == (200, "ready")


def test_a_config_with_every_default_filled_in_would_break_the_previous_sidecar(
    previous_sidecar: Path, tmp_path: Path
) -> None:
    """What the operator wrote before the skew policy: this release adds defaulted fields (e.g.
    providers[].allowPlainHTTP), which the previous sidecar refuses, so it would never become Ready."""
    document = load_policy(policy_body()).to_document()  # the old rendering: defaults filled in
    assert document["spec"]["providers"][0]["allowPlainHTTP"] is False
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(document))

    status, text = readiness(previous_sidecar, policy_file)

    assert status == 503 and "allowPlainHTTP" in text


def test_the_operator_writes_only_values_that_differ_from_the_defaults() -> None:
    body = policy_body()
    body["spec"]["routes"][0]["budget"] = "8s"  # the default, spelt out: the API server fills it in anyway
    rendered = render_sidecar_config(load_policy(body))
    route = rendered["spec"]["routes"][0]
    assert "budget" not in route and "backoff" not in route and "strategy" not in route
    assert "allowPlainHTTP" not in rendered["spec"]["providers"][0]
    assert rendered["metadata"]["annotations"][RENDERED_ANNOTATION].startswith("llmroute-operator ")
    reloaded, original = load_policy(rendered).spec, load_policy(body).spec
    assert reloaded.routes == original.routes and reloaded.retry_budget == original.retry_budget  # same effect


def test_the_sidecar_ignores_fields_of_a_newer_operator_with_a_warning() -> None:
    rendered = render_sidecar_config(load_policy(policy_body()))
    rendered["spec"]["routes"][0]["hedgeBudget"] = "2s"  # a field of some later release
    rendered["spec"]["futureFeature"] = {"enabled": True}

    loaded = load_policy(rendered)

    assert loaded.config_hash == load_policy(render_sidecar_config(load_policy(policy_body()))).config_hash
    assert "spec.routes[0].hedgeBudget: unknown field ignored (a newer operator's?)" in loaded.warnings
    assert "spec.futureFeature: unknown field ignored (a newer operator's?)" in loaded.warnings


def test_a_hand_written_policy_with_an_unknown_field_is_still_refused() -> None:
    """A typo in a file someone wrote must not silently do nothing."""
    body = policy_body()
    body["spec"]["routes"][0]["budegt"] = "2s"
    with pytest.raises(Exception, match=r"spec\.routes\[0\]\.budegt"):
        load_policy(body)


def test_unknown_fields_do_not_hide_real_errors_in_a_rendered_config() -> None:
    rendered = render_sidecar_config(load_policy(policy_body()))
    rendered["spec"]["futureFeature"] = True
    rendered["spec"]["routes"][0]["targets"][0]["provider"] = "nope"
    with pytest.raises(Exception, match='unknown provider "nope"'):
        load_policy(rendered)
