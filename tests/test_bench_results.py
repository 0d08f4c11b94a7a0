"""Every benchmark result the README and docs/ cite exists and says how to make it again: the
JSON is in the tree, records the command that made it, and that command's script, module or
`nanorun` subcommand exists (issue 26: a cited figure must stay reproducible)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from nanorun.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"bench/results/[\w./-]+?\.json")
# Tools a command may start with that are not this repository's (they install or launch it).
EXTERNAL = {"pip"}
# A cited path that is the output a command writes when run, not a committed result, and why.
NOT_COMMITTED = {
    "bench/results/h100/calibration.json": "docs/cost_model.md shows where bench/calibration.py "
                                           "writes on an H100; no H100 session has run it yet",
}


def cited() -> dict[str, list[str]]:
    """Each cited results path, with the documents citing it."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for path in CITED.findall(doc.read_text(encoding="utf-8")):
            found.setdefault(path, []).append(doc.name)
    return found


def commands(result: dict) -> list[str]:
    """The commands a result records: its "command", its provenance's, or each run's."""
    if isinstance(result.get("command"), str):
        return [result["command"]]
    if isinstance((result.get("provenance") or {}).get("command"), str):
        return [result["provenance"]["command"]]
    return [r["command"] for r in result.get("runs", []) if isinstance(r.get("command"), str)]


def runs_something_that_exists(command: str) -> str | None:
    """None when every step of `command` (split at &&) names a script, module or nanorun
    subcommand that exists here, else what is missing."""
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for step in command.split("&&"):
        words = [w for w in shlex.split(step) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        tool, args = words[0], words[1:]
        if tool in EXTERNAL:
            continue
        if tool == "nanorun":
            if args[0] not in subcommands:
                return f"nanorun has no subcommand {args[0]!r}"
            continue
        if tool in ("python", "python3", "torchrun", "bash"):
            module = args[args.index("-m") + 1] if "-m" in args else None
            if module is not None:
                if module == "pip":
                    continue
                path = ROOT / Path(*module.split("."))
                if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
                    return f"no module {module}"
                continue
            script = next(a for a in args if not a.startswith("-"))
            if not (ROOT / script).is_file():
                return f"no script {script}"
            continue
        return f"{tool!r} is neither a script runner, nanorun nor a known tool"
    return None


def test_the_docs_cite_results():
    assert len(cited()) >= 10, cited()


@pytest.mark.parametrize("path", sorted(cited()))
def test_a_cited_result_exists_and_records_a_command_that_exists(path):
    if path in NOT_COMMITTED:
        assert not (ROOT / path).exists(), f"{path} is committed now: drop it from NOT_COMMITTED"
        return
    file = ROOT / path
    assert file.is_file(), f"{path}, cited by {cited()[path]}, is not in the tree"
    found = commands(json.loads(file.read_text(encoding="utf-8")))
    assert found, f"{path} records no command that made it"
    for command in found:
        assert runs_something_that_exists(command) is None, (path, command,
                                                             runs_something_that_exists(command))


def test_the_checker_catches_a_command_that_is_gone():
    assert runs_something_that_exists("python bench/no_such_script.py --out x.json")
    assert runs_something_that_exists("python -m nanorun.no_such_module")
    assert runs_something_that_exists("nanorun no-such-subcommand")
    assert runs_something_that_exists("python bench/host_overhead.py") is None
    assert runs_something_that_exists("OMP_NUM_THREADS=1 bash .ci/run") is None


def test_no_bench_script_imports_a_private_name_of_the_package():
    """bench/ runs on the package's public API, so a refactor of its insides cannot silently
    break a benchmark a user runs."""
    import ast

    found = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "nanorun", "search", "models"):
                parts = [*(node.module or "").split("."), *(a.name for a in node.names)]
                if any(p.startswith("_") and p != "__version__" for p in parts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
