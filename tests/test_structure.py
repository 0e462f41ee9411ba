"""The shape of the code, kept true by the suite: the layers import only downward (`host` → `core` → `bus`
→ `cli`), no import cycle among vfiod's modules (runtime or TYPE_CHECKING imports alike), and no module of
`vfiod` or the simulator over 500 lines.

The two lists below are the known exceptions, each with the issue that removes it; a test fails when an
exception is no longer needed, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"host": 0, "core": 1, "bus": 2, "cli": 3}
MAX_LINES = 500

# module -> why it is still over the limit (and which change takes it under)
TOO_LONG: dict[str, str] = {}
# import cycles (each a strongly connected set of modules) still to be broken, and by what
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "vfiod").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The vfiod modules `name` imports (every import statement, TYPE_CHECKING and function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x: relative to the package, one level up per extra dot
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base])
            # `from pkg import submodule` depends on the submodule; like `from pkg.mod import x`, it needs
            # pkg's __init__ only as every import of pkg.anything does.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            module = target
            while module and module not in known:
                module = module.rpartition(".")[0]  # vfiod.host.host.Host -> vfiod.host.host
            if module and module != name:
                out.add(module)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_layers_import_only_downward() -> None:
    upward = []
    for module, imports in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        for imported in imports:
            theirs = _layer(imported)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_beyond_the_known_ones() -> None:
    cycles = _cycles(_graph())
    assert sorted(sorted(c) for c in cycles - set(KNOWN_CYCLES)) == [], "a new import cycle"
    assert sorted(sorted(c) for c in set(KNOWN_CYCLES) - cycles) == [], "gone: remove it from KNOWN_CYCLES"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset({"a", "b", "c"})}
    assert _cycles({"a": {"b"}, "b": set()}) == set()


def test_modules_stay_under_the_line_limit() -> None:
    over = {}
    for base in ("vfiod", "vfiod_sim"):
        for path in sorted((REPO / base).rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                over[str(path.relative_to(REPO))] = lines
    assert sorted(set(over) - set(TOO_LONG)) == [], over
    assert sorted(set(TOO_LONG) - set(over)) == [], "under the limit now: remove it from TOO_LONG"
