"""The import contract of docs/architecture.md: no module imports a package of a higher layer (module-level
and deferred imports alike), and the packages below the workflows import each other without cycles."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bnrhn"

# Bottom to top, as in docs/architecture.md; True: the units of that layer may import each other.
LAYERS: list[tuple[str, tuple[str, ...], bool]] = [
    ("foundation", ("__init__", "errors", "folder_lock", "openmp_wait", "freed_memory", "devices", "autodiff", "kernels"), True),
    ("layers", ("layers",), False),
    ("cells", ("cells",), False),
    ("runner", ("nn",), False),
    ("components", ("models", "data", "metrics", "encoders", "decoding", "reports", "training"), False),
    ("workflows", ("analysis", "captioning", "lm", "tasks", "experiments"), True),
    ("interfaces", ("commands", "serve", "cli", "__main__"), True),
]
RANK = {unit: k for k, (_, units, _) in enumerate(LAYERS) for unit in units}
PEERS_ALLOWED = {k for k, (_, _, peers) in enumerate(LAYERS) if peers}


def unit_of(path: Path) -> str:
    """The package (or top-level module) a source file belongs to."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> list[tuple[int, str]]:
    """(line, unit) of every bnrhn import in a file, at any depth (deferred imports in functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "bnrhn" else [f"bnrhn.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import (the contract reads absolute ones)")
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "bnrhn":
                continue
            target = parts[1] if len(parts) > 1 else "__init__"
            found.append((node.lineno, target if target in RANK else "__init__"))
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SRC.rglob("*.py")):
        for _, target in imported_units(path):
            if target != unit_of(path):
                graph[unit_of(path)].add(target)
    return graph


def test_every_unit_is_in_a_layer():
    units = {unit_of(p) for p in SRC.rglob("*.py")}
    assert units <= set(RANK), f"add to LAYERS (and docs/architecture.md): {sorted(units - set(RANK))}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        source = unit_of(path)
        for line, target in imported_units(path):
            if target == source:
                continue
            higher = RANK[target] > RANK[source]
            peer = RANK[target] == RANK[source] and RANK[source] not in PEERS_ALLOWED
            if higher or peer:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {source} ({LAYERS[RANK[source]][0]}) imports "
                           f"{target} ({LAYERS[RANK[target]][0]})")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_cycles_below_the_workflows():
    graph = import_graph()
    low = {u for u in RANK if RANK[u] < RANK["analysis"]}
    state: dict[str, int] = {}

    def visit(u, trail):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if v not in low:
                continue
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, u, v]))
            if v not in state:
                visit(v, [*trail, u])
        state[u] = 2

    for u in sorted(low):
        if u not in state:
            visit(u, [])


@pytest.mark.parametrize("case,expected", [
    ("from bnrhn.nn import Recurrent\n", ["nn"]),
    ("def f():\n    from bnrhn.captioning.api import train\n", ["captioning"]),
    ("import bnrhn.cells.base as b\n", ["cells"]),
    ("from bnrhn import kernels, __version__\n", ["kernels", "__init__"]),
])
def test_the_checker_sees_every_form_of_import(tmp_path, case, expected):
    """The contract's parser finds module-level, deferred, aliased and package-root imports."""
    f = tmp_path / "probe.py"
    f.write_text(case)
    assert [t for _, t in imported_units(f)] == expected
