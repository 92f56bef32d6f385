"""5. The loop closed: a policy reconciled by the operator, a pod injected by the webhook, and the sidecar
run from that stored pod's spec — its environment (Secret references resolved as the kubelet does),
the ConfigMap's policy.json and the projected key files laid out on disk as the kubelet mounts them. An
app request through it (the official SDK) reaches a fake provider, fails over to the fallback, and
sheds on a fake status page's outage read through the webhook's status relay."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import shutil
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from tests.e2e.cluster import Cluster, Process, free_port, start_process, wait_for
from tests.e2e.conftest import (
    APP_NAMESPACE,
    KEYS,
    KEYS_SECRET,
    LLMROUTE,
    POLICIES,
    Component,
    Release,
    wait_reconciled,
    write_as_kubelet,
)
from tests.e2e.test_webhook import PODS, pod

from llmroute_operator import INJECTED_ANNOTATION
from llmroute_operator.settings import POLICY_FILE
from llmroute_sidecar.policy import KEY_MOUNT_DIR, load_policy
from llmroute_sidecar.simulator.fake_statuspage import FakeStatusPage
from llmroute_sidecar.simulator.fakes import Fail, FakeProvider

pytestmark = pytest.mark.e2e
CLAUDE_API_COMPONENT = "k8w3r06qmzrp"


def loop_policy(primary: FakeProvider, fallback: FakeProvider, page: FakeStatusPage) -> dict[str, Any]:
    """Two routes, each primary on its own provider (one watches the status page), one fallback. The fakes
    speak plain http on loopback: each provider opts in (allowPlainHTTP), and the release allowlists
    127.0.0.1 (operator.providerHosts)."""

    def key(name: str) -> dict[str, Any]:
        return {"secretKeyRef": {"name": KEYS_SECRET, "key": name}}

    def route(name: str, provider: str) -> dict[str, Any]:
        return {
            "name": name,
            "budget": "4s",
            "targets": [
                {"name": "primary", "provider": provider, "model": "claude-sonnet-4-5"},
                {"name": "backup", "provider": "gpt", "model": "gpt-4.1-mini", "degraded": True},
            ],
        }

    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": "loop", "namespace": APP_NAMESPACE},
        "spec": {
            "providers": [
                {
                    "name": "claude",
                    "type": "anthropic",
                    "baseURL": primary.anthropic_base_url,
                    "allowPlainHTTP": True,
                    "apiKey": key("anthropic"),
                    "statusPage": {
                        "url": f"{page.url}/api/v2/summary.json",
                        "components": [CLAUDE_API_COMPONENT],
                        "pollInterval": "10s",
                        "confirmAfter": 1,
                    },
                },
                {"name": "claude-direct", "type": "anthropic", "baseURL": primary.anthropic_base_url,
                 "allowPlainHTTP": True, "apiKey": key("anthropic")},
                {"name": "gpt", "type": "openai", "baseURL": fallback.openai_base_url, "allowPlainHTTP": True,
                 "apiKey": key("openai")},
            ],
            "defaultRoute": "chat",
            "routes": [route("chat", "claude"), route("summarize", "claude-direct")],
        },
    }  # fmt: skip


def sidecar_environment(cluster: Cluster, container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet gives it: values as written, secretKeyRefs read from the Secret."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
            secret = cluster.api("GET", f"/api/v1/namespaces/{APP_NAMESPACE}/secrets/{ref['name']}")
            if ref["key"] in secret.get("data", {}):
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def mount_volumes(cluster: Cluster, stored_pod: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """The policy ConfigMap and the projected key Secret volumes, written as the kubelet writes them."""
    volumes = {volume["name"]: volume for volume in stored_pod["spec"]["volumes"]}
    configmap = cluster.api(
        "GET", f"/api/v1/namespaces/{APP_NAMESPACE}/configmaps/{volumes['llmroute-policy']['configMap']['name']}"
    )
    policy_dir, keys_dir = root / "policy", root / "keys"
    write_as_kubelet(policy_dir, {name: text.encode() for name, text in configmap["data"].items()})
    files = {}
    for source in volumes["llmroute-keys"]["projected"]["sources"]:
        secret = cluster.api("GET", f"/api/v1/namespaces/{APP_NAMESPACE}/secrets/{source['secret']['name']}")
        for item in source["secret"]["items"]:
            files[item["path"]] = base64.b64decode(secret["data"][item["key"]])
    write_as_kubelet(keys_dir, files)
    return policy_dir, keys_dir


def start_sidecar(
    container: dict[str, Any], env: dict[str, str], policy_dir: Path, keys_dir: Path, log_dir: Path
) -> Process:
    """`llmroute <the container's args>` in a mount namespace of its own where the key files sit at the
    path the rendered policy names (KEY_MOUNT_DIR), as in the pod. The policy path is the one deviation
    besides the port: it is an argument, so it points at the written ConfigMap volume directly."""
    args = [str(policy_dir / Path(arg).name) if arg == POLICY_FILE else arg for arg in container["args"]]
    run_dir = str(Path(KEY_MOUNT_DIR).parent.parent)  # /var/run/llmroute/keys -> /var/run
    script = (
        f"mount -t tmpfs tmpfs {run_dir} && mkdir -p {KEY_MOUNT_DIR} && "
        f"mount --bind {shlex.quote(str(keys_dir))} {KEY_MOUNT_DIR} && "
        f"exec {shlex.quote(str(LLMROUTE))} {shlex.join(args)}"
    )
    return start_process(
        "sidecar", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], log_dir, env
    )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider, FakeStatusPage]]:
    primary = FakeProvider("primary", reply_text="from the primary", expect_api_key=KEYS["anthropic"])
    fallback = FakeProvider("fallback", reply_text="from the fallback", expect_api_key=KEYS["openai"])
    page = FakeStatusPage.claude()
    async with primary, fallback, page:
        yield primary, fallback, page


@pytest.mark.timeout(240)
async def test_the_sidecar_from_the_stored_pod_fails_over_and_sheds_on_the_relayed_status_page(
    release: Release,
    operator: Component,
    webhook: Component,
    app_keys: dict[str, str],
    fakes: tuple[FakeProvider, FakeProvider, FakeStatusPage],
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting the key files at the pod's path needs root and unshare(1)")
    primary, fallback, page = fakes
    cluster = release.cluster
    loop = asyncio.get_running_loop()

    async def blocking(function: Any, *args: Any) -> Any:
        return await loop.run_in_executor(None, function, *args)

    await blocking(cluster.apply, loop_policy(primary, fallback, page))
    policy = await blocking(wait_reconciled, cluster, "loop")
    stored = await blocking(cluster.api, "POST", PODS, pod("loop-app", "loop"))
    assert stored["metadata"]["annotations"][INJECTED_ANNOTATION] == f"loop@{policy['status']['configHash']}"
    container = stored["spec"]["initContainers"][0]
    env = await blocking(sidecar_environment, cluster, container)
    port = free_port()
    env["LLMROUTE_LISTEN"] = f"127.0.0.1:{port}"  # each pod has its own loopback; this host has one
    assert env["LLMROUTE_STATUS_RELAY"] == webhook.env["LLMROUTE_STATUS_RELAY"], "the webhook injected its relay"
    policy_dir, keys_dir = await blocking(mount_volumes, cluster, stored, tmp_path)
    assert json.loads((policy_dir / "policy.json").read_text())["spec"]["providers"][0]["apiKey"]["file"].startswith(
        KEY_MOUNT_DIR
    )
    sidecar = start_sidecar(container, env, policy_dir, keys_dir, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if sidecar.popen.poll() is not None:
                raise RuntimeError(f"the sidecar exited:\n{sidecar.tail()}")
            with urllib.request.urlopen(base + "/readyz", timeout=2) as answer:
                return bool(answer.status == 200)

        await blocking(wait_for, "the sidecar's /readyz", ready, 60)
        status = await blocking(_get_json, base + "/status")
        rendered = load_policy(json.loads((policy_dir / "policy.json").read_text(encoding="utf-8")))
        assert status["configHash"] == rendered.config_hash, "it runs the ConfigMap's policy.json"
        client = anthropic.AsyncAnthropic(base_url=f"{base}/anthropic", api_key="placeholder", max_retries=0)

        async def ask(route: str) -> tuple[str, dict[str, str]]:
            raw = await client.messages.with_raw_response.create(
                model="claude-sonnet-4-5",
                max_tokens=64,
                messages=[{"role": "user", "content": "Summarize: the printer is on fire."}],
                extra_headers={"llmroute-route": route},
            )
            message = await raw.parse()
            return "".join(getattr(block, "text", "") for block in message.content), dict(raw.headers)

        text, headers = await ask("chat")  # the primary, with the key from the projected file
        assert (text, headers["llmroute-target"], headers["llmroute-degraded"]) == (
            "from the primary",
            "primary",
            "false",
        )

        primary.script(Fail(status=529), times=200)  # an outage the status page has not noticed
        text, headers = await ask("summarize")
        assert (text, headers["llmroute-target"], headers["llmroute-degraded"]) == (
            "from the fallback",
            "backup",
            "true",
        )
        assert headers["llmroute-shed-reason"] == "budget-exhausted"
        primary.clear()

        page.set_component(CLAUDE_API_COMPONENT, "major_outage")  # now the status page says so

        def shedding() -> dict[str, Any] | None:
            claude = _get_json(base + "/status")["providers"]["claude"]
            return claude if claude["shedding"] == 1 else None

        reading = await blocking(wait_for, "the sidecar to shed claude", shedding, 60, 0.5)
        assert reading["source"] == "relay", "read through the webhook's relay, not polled by the sidecar"
        before = primary.count()
        text, headers = await ask("chat")
        assert (text, headers["llmroute-target"], headers["llmroute-shed-reason"]) == (
            "from the fallback",
            "backup",
            "status-page",
        )
        assert primary.count() == before, "a shed request never reaches the primary"

        def operator_sees_it() -> bool:
            found = cluster.get(f"{POLICIES}/loop") or {}
            return bool(found.get("status", {}).get("sheddingProviders") == ["claude"])

        await blocking(wait_for, "the Shedding column", operator_sees_it, 60)
        row = await blocking(cluster.kubectl, "get", "-n", APP_NAMESPACE, "lrp", "loop", "--no-headers")
        assert '["claude"]' in row.split(), "the Shedding column"
    finally:
        sidecar.stop()
        await blocking(cluster.api, "DELETE", f"{PODS}/loop-app?gracePeriodSeconds=0")
