"""One direction of imports: no import cycle anywhere, and the runtime never imports the search.

The source tree's imports are read statically (ast), so what counts is every import a module
can execute, not only those one run happens to take: `import` and `from ... import` at module
level, inside functions and under `if TYPE_CHECKING:`, and importlib.import_module("...") with
a literal name. Modules are named as they install (pyproject's wheel.packages: search/ is
nanorun.search, models/ is nanorun.models); bench/ scripts are modules too (bench.NAME), with
their bare imports of each other. tests/ are left aside.

An edge A -> B means A imports B. `from P import N` is an edge to the module P.N when that is
one of ours, else to P when P's __init__ binds N; a name bound nowhere in our sources is a
compiled extension (nanorun._core, nanorun._cuda), which imports nothing of ours. Parent
packages are not edges: Python runs a package's __init__ before its submodules, and a
submodule importing while its parent initialises is what packages do; a module that does
import its package's __init__ (`from nanorun import __version__`) gets an edge to it.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository's source folders and the names they install as (pyproject.toml's
# [tool.scikit-build] wheel.packages), and bench/'s scripts.
PACKAGES = {"nanorun": "nanorun", "search": "nanorun.search", "models": "nanorun.models",
            "bench": "bench"}
RUNTIME, SEARCH = "nanorun", "nanorun.search"



def _module_name(folder: str, path: Path) -> str:
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[folder]] + parts)


@lru_cache(maxsize=None)
def sources() -> dict[str, Path]:
    """Every module of the source tree by its installed name."""
    out = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(folder, path)] = path
    return out


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


@lru_cache(maxsize=None)
def _bound_names(path: Path) -> set[str]:
    """Names a module binds at its top level (what `from module import name` can find)."""
    names = set()
    for node in _tree(path).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _target(name: str, importer: str) -> str | None:
    """The module of ours that importing `name` from `importer` runs, None if none."""
    mods = sources()
    if importer.startswith("bench.") and f"bench.{name}" in mods:   # a script's sibling
        name = f"bench.{name}"
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, int, str]]:
    """(imported module of ours, line, how it was written) for every import in `module`."""
    path = sources()[module]
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((_target(a.name, module), node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - (not is_package)]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            text = f"from {'.' * node.level}{node.module or ''} import ..."
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in sources():
                    out.append((sub, node.lineno, text))
                elif base in sources() and a.name in _bound_names(sources()[base]):
                    out.append((base, node.lineno, text))
                elif base not in sources():
                    out.append((_target(base, module), node.lineno, text))
                # else: a compiled extension module of package `base` (nanorun._core)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.append((_target(node.args[0].value, module), node.lineno,
                        f"import_module({node.args[0].value!r})"))
    return [(t, line, text) for t, line, text in out if t is not None and t != module]


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


@lru_cache(maxsize=None)
def graph() -> dict[str, tuple[tuple[str, int, str], ...]]:
    return {m: tuple(_imports(m)) for m in sources()}


def _cycle() -> list[str] | None:
    """One import cycle (its modules in import order, the first repeated last), or None."""
    edges = {m: sorted({t for t, _, _ in e}) for m, e in graph().items()}
    state: dict[str, int] = {}           # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, todo = [start], [iter(edges[start])]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(edges[nxt]))
    return None


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _runtime(module: str) -> bool:
    """nanorun/ itself: not the search, not the models (their own folders)."""
    return _in(module, RUNTIME) and not _in(module, SEARCH) and not _in(module, "nanorun.models")


def test_the_walk_sees_the_tree():
    """The checks below are only as good as the walk: it must see the modules and the edges
    this test is about (a function-level import included)."""
    mods = sources()
    assert {"nanorun.engine", "nanorun.search.tune", "nanorun.models.llama", "nanorun.device",
            "nanorun.cli", "bench.cost_model_tp"} <= set(mods)
    targets = {m: {t for t, _, _ in e} for m, e in graph().items()}
    assert "nanorun.layout" in targets["nanorun.search.tune"]          # module level
    assert "nanorun.executor" in targets["nanorun.search.measure"]     # inside a function
    assert "nanorun.device" in targets["nanorun.engine_builder"]
    assert "nanorun" not in targets["nanorun.kv_cache"]                # `from . import _core`


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, (
        "import cycle: " + " -> ".join(cycle) + "; each module's imports: "
        + "; ".join(f"{a}:{line} {text}" for a, b in zip(cycle, cycle[1:])
                    for t, line, text in graph()[a] if t == b))


def test_the_runtime_never_imports_the_search():
    found = [f"{m}:{line} {text}" for m, edges in graph().items()
             if _runtime(m)
             for t, line, text in edges if _in(t, SEARCH)]
    assert not found, ("the runtime imports the search (search/ reads nanorun, never the "
                       "reverse; put what both need in nanorun/): " + ", ".join(found))


def test_the_models_import_neither_runtime_nor_search():
    """Model families are plain math over named ops: everything else reads them."""
    found = [f"{m}:{line} -> {t}" for m, edges in graph().items() if _in(m, "nanorun.models")
             for t, line, _ in edges if not _in(t, "nanorun.models")]
    assert not found, ", ".join(found)


def test_the_search_adds_its_commands_through_the_entry_point():
    """`nanorun tune` and the search's other subcommands reach the command through the
    installed `nanorun.commands` entry point, not an import of the search by nanorun/cli.py."""
    from importlib.metadata import entry_points

    from nanorun.cli import build_parser

    registered = {e.name: e.value for e in entry_points(group="nanorun.commands")}
    assert registered.get("search") == "nanorun.search.cli:add_parsers", registered
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"tune", "plan", "profile", "provision", "generate", "bench", "serve"} <= set(commands)


def test_the_folders_are_imported_by_their_installed_names():
    """`import search...` or `import models...` finds the repository's folders only when run
    from its root, and loads a second copy of modules already imported as nanorun.search or
    nanorun.models."""
    found = []
    for m, path in sources().items():
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{m}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in ("search", "models")]
    assert not found, ", ".join(found)
