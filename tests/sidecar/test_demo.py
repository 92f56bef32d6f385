"""`llmroute demo` as a user (and CI) runs it: a subprocess, no terminal, a report at the end.

Why this exists: the demo is the first command a newcomer runs and CI runs it headless in its short mode;
it must exit 0 and leave `index.html` and `timeline.png` behind, and Ctrl-C must stop it cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmroute_sidecar.cli", "demo", *args]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "sidecar"), str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TERM": "dumb", "COLUMNS": "160"}


def test_demo_quick_runs_headless_and_writes_the_report(tmp_path):
    report = tmp_path / "demo-report"
    started = time.monotonic()
    done = subprocess.run(_command("--quick", "--report-dir", str(report)), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed < 60
    output = done.stdout
    assert "answered" in output and "fallback" in output
    assert "t=" in output  # the plain progress lines of the headless view
    assert "\x1b[" not in output  # no terminal escapes without a terminal
    html = (report / "index.html").read_text()
    assert "timeline.png" in html and "quick" in html
    assert (report / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "run.json").exists() and (report / "sidecar.log").exists()


def test_the_issues_timeline_meets_its_figures_with_the_default_policy(tmp_path):
    """The shipped scenario (8 req/s; two 2 s microspikes of 529s; a 40 s outage; a healthy fallback),
    played at 5x: every request answered, no fallback answer in a microspike, outage p50 under 1 s, at
    most 1.3 upstream calls per answer, answers degraded for at most 5 s' worth beyond the outage although
    the status page admits recovery late (its `expect` block; `--strict` exits 1 on a miss)."""
    done = subprocess.run(_command("--speed", "5", "--strict", "--report-dir", str(tmp_path)), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 5 and all(line.startswith("PASS") for line in verdicts), verdicts
    assert "scenario microspikes-and-outage" in done.stdout


def test_demo_stops_cleanly_on_ctrl_c(tmp_path):
    report = tmp_path / "demo-report"
    process = subprocess.Popen(_command("--quick", "--report-dir", str(report)), cwd=ROOT, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the first progress line: traffic is flowing
            line = process.stdout.readline()
            if line.startswith("t=") or not line:
                break
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert (report / "index.html").exists() and (report / "timeline.png").exists()
