"""The chart's alerts, unit-tested with the real `promtool test rules` on the rules the chart renders.

For every alert, series that fire it (with its summary and description as Alertmanager receives them)
and series that must not. The defaults are what is tested: a team that only sets
`monitoring.prometheusRule.enabled=true` gets exactly these thresholds. The microspike case is the
project's promise in alert form: a 2-second burst of sheds never pages anyone.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.monitoring.tools import alerts, require, rule_groups, write_rules

RUNBOOK = "https://github.com/llmroute/llmroute/blob/main/docs/runbook.md"
SHOP = {"namespace": "shop", "route": "summarize"}


@dataclass(frozen=True)
class Case:
    """Input series, and what the alert must look like at `at` (None: not firing, nor anything else)."""

    series: dict[str, str]
    at: str
    labels: dict[str, str] | None = None
    summary: str = ""
    description: str = ""
    interval: str = "1m"
    also_quiet_at: tuple[str, ...] = field(default_factory=tuple)
    """Earlier times at which the alert must not fire yet (its `for` has not elapsed)."""


def share_series(reason: str, per_minute: int) -> dict[str, str]:
    """A route with 600 requests a minute, `per_minute` of them shed for `reason`, for 40 minutes."""
    return {
        'llmroute_requests_total{namespace="shop", pod="shop-1", route="summarize", target="primary", '
        'degraded="false", outcome="ok"}': "0+600x40",
        f'llmroute_shed_total{{namespace="shop", pod="shop-1", route="summarize", reason="{reason}"}}':
            f"0+{per_minute}x40",
    }


CASES: dict[str, list[Case]] = {
    "LLMRouteFallbackHigh": [
        Case(share_series("circuit-open", 300), "30m", {**SHOP, "severity": "warning"},
             "Route summarize answers from its fallback",
             "50% of the requests of route summarize in shop were shed off their primary target "
             "(over 5m, threshold 0.1).", also_quiet_at=("8m",)),
        Case(share_series("status-page", 30), "30m"),  # 5 %: below the threshold
        Case(share_series("quorum", 300), "30m"),  # quorum answers are no fallback
        # A 2-second microspike: every request of those two seconds shed, 8 requests a second all along.
        Case({
            'llmroute_requests_total{namespace="shop", pod="shop-1", route="summarize", target="primary", '
            'degraded="false", outcome="ok"}': "0+8x1800",
            'llmroute_shed_total{namespace="shop", pod="shop-1", route="summarize", reason="circuit-open"}':
                "0x600 8 16x1199",
        }, "30m", interval="1s", also_quiet_at=("10m2s", "10m30s", "12m", "15m", "20m")),
    ],
    "LLMRouteCircuitOpen": [
        Case({'llmroute_circuit_open{namespace="shop", pod="shop-1", target="primary"}': "0 1x20"}, "10m",
             {"namespace": "shop", "target": "primary", "severity": "warning"},
             "Target primary has its circuit open",
             "The circuit of target primary in shop has been open for 5m: its provider is failing, requests "
             "skip it.", also_quiet_at=("4m",)),
        Case({'llmroute_circuit_open{namespace="shop", pod="shop-1", target="primary"}': "0x5 1x2 0x13"}, "7m",
             also_quiet_at=("6m", "10m")),  # open for two minutes: a brownout, not an outage
    ],
    "LLMRouteStatusPageOutage": [
        Case({'llmroute_statuspage_indicator{namespace="shop", pod="shop-1", provider="claude"}': "3x10"}, "5m",
             {"namespace": "shop", "provider": "claude", "severity": "info"},
             "The status page of claude reports an outage",
             "The status page of provider claude is at level 3 (0 none .. 3 critical) for the sidecars in shop; "
             "they shed its traffic per the policy.", also_quiet_at=("1m",)),
        Case({'llmroute_statuspage_indicator{namespace="shop", pod="shop-1", provider="claude"}': "2x10"}, "5m"),
    ],
    "LLMRouteRetryBudgetExhausted": [
        Case({'llmroute_retry_budget_exhausted_total{namespace="shop", pod="shop-1", provider="claude"}':
              "0+60x30"}, "20m", {"namespace": "shop", "provider": "claude", "severity": "warning"},
             "The retry budget of claude is exhausted",
             "Sidecars in shop refuse 1 retries per second to provider claude: its retry budget is spent "
             "(threshold 0.1/s).", also_quiet_at=("9m",)),
        Case({'llmroute_retry_budget_exhausted_total{namespace="shop", pod="shop-1", provider="claude"}':
              "0+3x30"}, "20m"),
    ],
    "LLMRouteBudgetExhaustedOften": [
        Case(share_series("budget-exhausted", 60), "20m", {**SHOP, "severity": "warning"},
             "Route summarize often runs out of its budget",
             "10% of the requests of route summarize in shop gave up on the primary when the route budget ran "
             "out (threshold 0.05).", also_quiet_at=("9m",)),
        Case(share_series("budget-exhausted", 12), "20m"),
    ],
    "LLMRouteParallelSpendHigh": [
        Case({
            'llmroute_requests_total{namespace="shop", pod="shop-1", route="summarize", outcome="ok"}': "0+600x40",
            'llmroute_quorum_calls_total{namespace="shop", pod="shop-1", route="summarize", result="call"}':
                "0+300x40",
        }, "30m", {**SHOP, "severity": "warning"},
            "Route summarize spends more on quorum and hedge calls than expected",
            "Route summarize in shop makes 500m quorum or hedge calls per request (threshold 0.25).",
            also_quiet_at=("14m",)),
        Case({  # a 5 % quorum sample over two targets: 0.1 calls per request, as designed
            'llmroute_requests_total{namespace="shop", pod="shop-1", route="summarize", outcome="ok"}': "0+600x40",
            'llmroute_quorum_calls_total{namespace="shop", pod="shop-1", route="summarize", result="call"}':
                "0+60x40",
        }, "30m"),
    ],
    "LLMRouteRateLimitShedding": [
        Case(share_series("rate-limit", 60), "20m", {**SHOP, "severity": "warning"},
             "Route summarize sheds on its provider's rate limits",
             "10% of the requests of route summarize in shop were shed because the primary's rate limit was "
             "near (threshold 0.05).", also_quiet_at=("9m",)),
        Case(share_series("rate-limit", 6), "20m"),
    ],
    "LLMRouteContextWindowFallbacks": [
        Case(share_series("context-window", 30), "30m", {**SHOP, "severity": "info"},
             "Prompts of route summarize outgrow the primary's context window",
             "5% of the requests of route summarize in shop failed over for the context window "
             "(threshold 0.01).", also_quiet_at=("14m",)),
        Case(share_series("context-window", 3), "30m"),
    ],
    "LLMRoutePolicyLoadFailing": [
        Case({'llmroute_policy_load_failing{namespace="shop", pod="shop-1"}': "0 1x10"}, "8m",
             {"namespace": "shop", "pod": "shop-1", "severity": "warning"},
             "Sidecar shop/shop-1 refuses its newest policy",
             "The sidecar of pod shop-1 in shop cannot load its newest policy and keeps serving the last good "
             "one (for 5m).", also_quiet_at=("4m",)),
        Case({'llmroute_policy_load_failing{namespace="shop", pod="shop-1"}': "0 1x2 0x8"}, "8m",
             also_quiet_at=("2m",)),  # a half-written file, fixed a minute later
    ],
    "LLMRouteSidecarNotReady": [
        Case({'llmroute_ready{namespace="shop", pod="shop-1"}': "1 0x10"}, "8m",
             {"namespace": "shop", "pod": "shop-1", "severity": "warning"},
             "Sidecar shop/shop-1 is not ready",
             "The sidecar of pod shop-1 in shop has no valid policy, is draining, or cannot be scraped "
             "(for 5m).", also_quiet_at=("4m",)),
        Case({'up{namespace="shop", pod="shop-1", container="llmroute", job="shop/llmroute-sidecars"}': "0x10"},
             "8m", {"namespace": "shop", "pod": "shop-1", "severity": "warning"},
             "Sidecar shop/shop-1 is not ready",
             "The sidecar of pod shop-1 in shop has no valid policy, is draining, or cannot be scraped "
             "(for 5m)."),
        Case({'llmroute_ready{namespace="shop", pod="shop-1"}': "0x1 1x10",  # starting up
              'up{namespace="shop", pod="shop-1", container="llmroute", job="shop/llmroute-sidecars"}': "1x10",
              'up{namespace="shop", pod="shop-1", container="app", job="shop/app"}': "0x10"}, "8m"),
    ],
    "LLMRouteStatusRelayNotPolling": [
        Case({'llmroute_relay_page_usable{namespace="llmroute-system", pod="relay-1", '
              'url="https://status.claude.com/api/v2/summary.json"}': "1 0x20"}, "15m",
             {"namespace": "llmroute-system", "pod": "relay-1",
              "url": "https://status.claude.com/api/v2/summary.json", "severity": "warning"},
             "The status relay cannot read https://status.claude.com/api/v2/summary.json",
             "Relay pod relay-1 has had no usable reading of https://status.claude.com/api/v2/summary.json for "
             "10m; sidecars fall back to polling the page themselves.", also_quiet_at=("9m",)),
        Case({'llmroute_relay_page_usable{namespace="llmroute-system", pod="relay-1", url="https://x"}': "1 0x3 1x16"},
             "15m", also_quiet_at=("3m",)),
    ],
    "LLMRouteReconcileFailing": [
        Case({'llmroute_operator_reconciles_total{namespace="llmroute-system", pod="op-1", result="api_error"}':
              "0+6x40"}, "25m", {"namespace": "llmroute-system", "severity": "warning"},
             "The llmroute operator cannot reconcile policies",
             "The operator in llmroute-system gets Kubernetes API errors while reconciling policies (for 15m); "
             "new and changed policies do not reach the sidecars.", also_quiet_at=("14m",)),
        Case({'llmroute_operator_reconciles_total{namespace="llmroute-system", pod="op-1", result="api_error"}':
              "0x5 1x35"}, "25m", also_quiet_at=("8m",)),  # one error, retried fine
    ],
}


def promtool_test(case: Case, alert: str) -> dict[str, Any]:
    """One `promtool test rules` test: the case's series and its expectations."""
    expectations: list[dict[str, Any]] = [{"eval_time": t, "alertname": alert, "exp_alerts": []}
                                          for t in case.also_quiet_at]
    expected: list[dict[str, Any]] = []
    if case.labels is not None:
        expected.append({
            "exp_labels": case.labels,
            "exp_annotations": {
                "summary": case.summary, "description": case.description,
                "runbook_url": f"{RUNBOOK}#{alert.lower()}",
            },
        })
    expectations.append({"eval_time": case.at, "alertname": alert, "exp_alerts": expected})
    return {
        "interval": case.interval,
        "input_series": [{"series": name, "values": values} for name, values in case.series.items()],
        "alert_rule_test": expectations,
    }


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rules(tmp_path_factory.mktemp("rules") / "rules.yaml")


def test_every_alert_has_a_firing_and_a_quiet_case_and_a_runbook_section() -> None:
    rendered = alerts(rule_groups())
    assert set(rendered) == set(CASES)
    runbook = (Path(__file__).resolve().parents[2] / "docs" / "runbook.md").read_text()
    for alert, cases in CASES.items():
        assert any(case.labels is not None for case in cases), f"{alert}: no case fires it"
        assert any(case.labels is None for case in cases), f"{alert}: no case where it must stay quiet"
        assert f"## {alert}\n" in runbook, f"docs/runbook.md has no section for {alert}"
        section = runbook.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("What it means", "What to check", "What to do"):
            assert f"**{part}**" in section, f"{alert}: the runbook section lacks '{part}'"
        rule = rendered[alert]
        assert rule["annotations"]["runbook_url"].endswith(f"#{alert.lower()}")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_rules_are_valid_for_promtool(rules_file: Path) -> None:
    result = subprocess.run([str(require("promtool")), "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", sorted(CASES))
def test_the_alert_fires_on_its_case_and_stays_quiet_otherwise(alert: str, rules_file: Path, tmp_path: Path) -> None:
    document = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [promtool_test(case, alert) for case in CASES[alert]],
    }
    if any(case.interval != "1m" for case in CASES[alert]):
        document["evaluation_interval"] = "1s"  # the microspike case needs second-level evaluation
    test_file = tmp_path / f"{alert}.yaml"
    test_file.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run([str(require("promtool")), "test", "rules", str(test_file)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_and_durations_come_from_the_values() -> None:
    rendered = alerts(rule_groups(
        'json:monitoring.prometheusRule.fallback={"share": 0.3, "for": "2m"}',
        "monitoring.prometheusRule.rateWindow=1m", "monitoring.prometheusRule.alertLabels.team=payments",
        "monitoring.prometheusRule.statusPageOutage.level=2",
    ))
    fallback = rendered["LLMRouteFallbackHigh"]
    assert fallback["for"] == "2m" and "> 0.3" in fallback["expr"] and "[1m]" in fallback["expr"]
    assert fallback["labels"] == {"severity": "warning", "team": "payments"}
    assert rendered["LLMRouteStatusPageOutage"]["expr"].endswith(">= 2")
