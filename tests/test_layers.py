"""The architecture's import rules, checked: data flows one way and components stay apart.

- the sidecar never imports the operator (only the CLI, the composition root, reaches into both);
- the engine (policy, providers, strategies, budgets, health, status pages) never imports the HTTP
  server or the compatible endpoints;
- provider wire formats stay in their adapters: no engine module imports a concrete provider module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SIDECAR = Path(__file__).resolve().parents[1] / "sidecar" / "llmroute_sidecar"
ENGINE = ["policy", "strategies", "budgets", "health", "runtime", "streams", "checks", "prompts", "messages",
          "errors", "sse", "durations", "statuspages", "statuspolling", "statusboard", "telemetry", "scrubbing"]
SERVER_SIDE = {"server", "compat", "cli", "reloading", "malformed"}
CONCRETE_PROVIDERS = {"anthropic", "openai", "gemini"}


def imported_modules(path: Path) -> set[str]:
    """Absolute or package-relative names of everything `path` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" if base.endswith(".") is False else base + alias.name
                         for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(SIDECAR.rglob("*.py")), ids=lambda p: str(p.relative_to(SIDECAR)))
def test_the_sidecar_never_imports_the_operator(path: Path) -> None:
    if path.name == "cli.py" and path.parent == SIDECAR:
        return  # the composition root imports the operator lazily for `llmroute operator`
    assert not any("llmroute_operator" in name for name in imported_modules(path))


@pytest.mark.parametrize("module", ENGINE)
def test_the_engine_never_imports_the_server(module: str) -> None:
    names = imported_modules(SIDECAR / f"{module}.py")
    leaks = {name for name in names if name.lstrip(".").split(".")[0] in SERVER_SIDE}
    assert not leaks, f"{module}.py imports {leaks}"


@pytest.mark.parametrize("module", ENGINE)
def test_provider_wire_formats_stay_in_their_adapters(module: str) -> None:
    names = imported_modules(SIDECAR / f"{module}.py")
    concrete = {n for n in names if n.lstrip(".").startswith("providers.")
                and n.lstrip(".").split(".")[1] in CONCRETE_PROVIDERS}
    assert not concrete, f"{module}.py imports {concrete}"
