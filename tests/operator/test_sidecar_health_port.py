"""The injected sidecar's probe-only listener (`LLMROUTE_HEALTH_LISTEN`), on the real CLI.

In a pod it listens on the pod IP so the kubelet's httpGet probes reach it; here on loopback. It must
answer the probes as the main listener does, and serve nothing that spends a key."""

from __future__ import annotations

from pathlib import Path

from .sidecar_process import free_port, get, running_sidecar

ROOT = Path(__file__).resolve().parents[2]


def test_the_health_listener_answers_probes_and_nothing_else(tmp_path: Path) -> None:
    port = free_port()
    health = f"http://127.0.0.1:{port}"
    with running_sidecar(
        ROOT / "examples" / "standalone.yaml", env={"LLMROUTE_HEALTH_LISTEN": f"127.0.0.1:{port}"}
    ) as sidecar:
        assert get(f"{health}/healthz") == (200, "ok")
        assert get(f"{health}/readyz") == get(f"{sidecar.url}/readyz") == (200, "ready")
        assert get(f"{health}/status")[0] == 404
        assert get(f"{health}/metrics")[0] == 404
        assert get(f"{health}/v1/routes/summarize", "POST")[0] == 404
        assert get(f"{sidecar.url}/status")[0] == 200


def test_a_broken_policy_is_not_ready_on_the_health_listener(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("spec: {providers: [], routes: []}\n")
    port = free_port()
    with running_sidecar(policy, env={"LLMROUTE_HEALTH_LISTEN": f"127.0.0.1:{port}"}):
        status, text = get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and text.startswith("no valid policy")
