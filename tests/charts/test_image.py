"""The container image: its build context builds the wheel, and it runs every llmroute process as non-root.

No container engine runs here, so the Docker build is reproduced where it can break: the files that
`.dockerignore` lets into the build context, copied by the build stage's COPY lines exactly as Docker
would, must be enough for `pip install .` (hatchling) to build the wheel, with every package module and
every force-included example in it. A file the wheel needs but the image leaves out fails here, not in
`docker build`.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml
from tests.helm import helm_binary

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART = ROOT / "charts" / "llmroute"
SKIPPED = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


# --- .dockerignore, with Docker's semantics (moby/patternmatcher) ------------------------------------


@dataclass(frozen=True)
class Pattern:
    text: str
    exclusion: bool  # a `!pattern`: re-includes what it matches
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stop at `/`, `**` spans directories, `\\` escapes."""
    out, index = "", 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            if pattern[index + 1 : index + 2] == "*":
                index += 1
                if pattern[index + 1 : index + 2] == "/":
                    index += 1
                out += ".*" if index + 1 >= len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "\\" and index + 1 < len(pattern):
            index += 1
            out += re.escape(pattern[index])
        elif char in "[]":
            out += char  # character classes keep their meaning
        else:
            out += re.escape(char)
        index += 1
    return re.compile(f"^{out}$")


def parse_dockerignore(text: str) -> list[Pattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        line = line.removeprefix("!").strip()
        cleaned = str(PurePosixPath("/" + line)).lstrip("/") or "."  # filepath.Clean, root-relative
        patterns.append(Pattern(cleaned, exclusion, _compile(cleaned)))
    return patterns


def ignored(path: str, patterns: list[Pattern]) -> bool:
    """MatchesOrParentMatches: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    matched = False
    for pattern in patterns:
        if any(pattern.regex.match(prefix) for prefix in prefixes):
            matched = not pattern.exclusion
    return matched


def _may_reinclude_below(directory: str, patterns: list[Pattern]) -> bool:
    return any(
        p.exclusion and (p.text.startswith(directory + "/") or p.text.startswith(("*", "?", "["))) for p in patterns
    )


@cache
def build_context() -> frozenset[str]:
    """Relative paths of every file the Docker build context holds."""
    patterns = parse_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"))
    files: set[str] = set()
    stack = [ROOT]
    while stack:
        directory = stack.pop()
        for entry in directory.iterdir():
            relative = entry.relative_to(ROOT).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                if not ignored(relative, patterns) or _may_reinclude_below(relative, patterns):
                    stack.append(entry)
            elif not ignored(relative, patterns):
                files.add(relative)
    return frozenset(files)


# --- the Dockerfile ------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, arguments))
    return found


def _words(arguments: str) -> list[str]:
    return [str(word) for word in json.loads(arguments)] if arguments.startswith("[") else shlex.split(arguments)


def build_stage_copies() -> list[tuple[list[str], str]]:
    """The build stage's COPY lines (sources, destination) that come before `pip install .`."""
    [build, *_] = stages()
    copies: list[tuple[list[str], str]] = []
    for keyword, arguments in build:
        if keyword == "RUN" and re.search(r"pip install \.(\s|$)", arguments):
            return copies
        if keyword in ("COPY", "ADD"):
            words = [w for w in _words(arguments) if not w.startswith("--")]
            assert "--from" not in arguments, arguments
            *sources, destination = words
            copies.append((sources, destination))
    raise AssertionError("the build stage has no `pip install .`")


def stage_tree(target: Path) -> None:
    """Lay out in `target` (the build stage's WORKDIR) what the COPY lines put there."""
    context = build_context()
    for sources, destination in build_stage_copies():
        for source in sources:
            source = source.rstrip("/") or "."
            matched = sorted(f for f in context if fnmatch.fnmatchcase(f, source))
            below = sorted(f for f in context if f.startswith(source + "/"))
            assert matched or below, f"COPY {source}: not in the build context (see .dockerignore)"
            if below:  # a directory: its contents go into the destination
                for file in below:
                    _copy(ROOT / file, target / destination / file.removeprefix(source + "/"))
            for file in matched:
                into = destination.endswith("/") or len(sources) > 1
                _copy(ROOT / file, target / destination / PurePosixPath(file).name if into else target / destination)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


# --- what the wheel must hold -----------------------------------------------------------------------------


def _repo_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [
        p
        for p in path.rglob("*")
        if p.is_file() and not SKIPPED.intersection(p.relative_to(ROOT).parts) and p.suffix != ".pyc"
    ]


def expected_wheel_files() -> dict[str, str]:
    """Wheel path -> source path, from pyproject.toml's hatch configuration."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    expected: dict[str, str] = {}
    for package in wheel["packages"]:
        package_dir = ROOT / package
        for file in _repo_files(package_dir):
            expected[f"{package_dir.name}/{file.relative_to(package_dir).as_posix()}"] = str(file.relative_to(ROOT))
    for source, destination in wheel.get("force-include", {}).items():
        for file in _repo_files(ROOT / source):
            inside = file.relative_to(ROOT / source).as_posix() if (ROOT / source).is_dir() else ""
            expected[str(PurePosixPath(destination) / inside) if inside else destination] = str(file.relative_to(ROOT))
    return expected


def test_dockerignore_matching_follows_docker() -> None:
    patterns = parse_dockerignore("*\n!keep/\n!a/b/\n**/__pycache__\n# note\n")
    assert not ignored("keep/x.py", patterns)
    assert ignored("keep/__pycache__/x.pyc", patterns)
    assert ignored("a/other.txt", patterns) and not ignored("a/b/c.txt", patterns)
    assert ignored(".git/config", patterns) and ignored("README.md", patterns)


def test_build_context_holds_every_file_the_wheel_is_built_from() -> None:
    context = build_context()
    missing = sorted(source for source in expected_wheel_files().values() if source not in context)
    assert not missing, f".dockerignore leaves out files the wheel needs: {missing}"
    assert {"pyproject.toml", "README.md"} <= context
    assert not [f for f in context if f.startswith(("tests/", "charts/", ".venv/", ".git/", "bench/"))]


@pytest.mark.timeout(600)
def test_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path: Path) -> None:
    source, out = tmp_path / "src", tmp_path / "dist"
    stage_tree(source)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)]
    if importlib.util.find_spec("hatchling") is not None:
        command.insert(4, "--no-build-isolation")  # offline: the backend is already installed
    result = subprocess.run(command, capture_output=True, text=True, timeout=540, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = out.glob("llmroute-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    missing = sorted(set(expected_wheel_files()) - names)
    assert not missing, f"the image's wheel lacks: {missing}"
    assert "llmroute_sidecar/simulator/examples/demo-policy.yaml" in names
    assert any(n.startswith("llmroute_sidecar/simulator/examples/scenarios/") for n in names)
    assert re.search(r"^llmroute = llmroute_sidecar\.cli:main$", scripts, re.MULTILINE), scripts


def test_image_runs_as_the_non_root_user_the_chart_expects() -> None:
    *_, runtime = stages()
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users, "the runtime stage sets no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, "numeric non-root uid (runAsNonRoot can only verify a number)"
    assert not group or (group.isdigit() and int(group) != 0)
    result = subprocess.run(
        [str(helm_binary()), "template", "llmroute", str(CHART), "--namespace", "llmroute-system"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    deployments = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_entrypoint_serves_operator_webhook_and_sidecar(capsys: pytest.CaptureFixture[str]) -> None:
    *_, runtime = stages()
    [entrypoint] = [_words(arguments) for keyword, arguments in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == ["llmroute"], "exec form, so `args: [operator]` in a pod runs `llmroute operator`"
    from llmroute_operator.injection import sidecar_container
    from llmroute_operator.settings import Settings
    from llmroute_sidecar.cli import main
    from llmroute_sidecar.policy import load_policy

    for command in ("operator", "webhook", "sidecar"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0, command
        assert f"llmroute {command}" in capsys.readouterr().out, command
    policy = load_policy(yaml.safe_load((ROOT / "examples" / "cluster-policy.yaml").read_text(encoding="utf-8")))
    injected = sidecar_container(policy, Settings())
    assert "command" not in injected and injected["args"][0] == "sidecar"  # the image runs `llmroute sidecar`
