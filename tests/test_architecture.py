"""The layout's rules, checked on the source: no import cycles, and solvers/ never imports flowdiff/.

Every ``import`` is counted, at module level or inside a function: a function-level import that
closes a circle still makes the modules depend on each other (and breaks when moved to the top).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("solvers", "flowdiff")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                hit = known(target)
                if hit is not None and hit != module:
                    graph[module].add(hit)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_edges(_modules()))
    assert not cycles, f"import cycles (counting imports inside functions): {cycles}"


def test_solvers_never_imports_flowdiff():
    graph = _edges(_modules())
    leaks = {m: sorted(t for t in targets if t.split(".")[0] == "flowdiff")
             for m, targets in graph.items() if m.split(".")[0] == "solvers"}
    assert not any(leaks.values()), leaks


def test_the_checker_sees_a_cycle(tmp_path):
    """The test above can fail: two modules importing each other inside functions form a cycle."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert _cycles(graph) == [["p.a", "p.b"]]


@pytest.mark.parametrize("module", ["flowdiff.api.sampling", "flowdiff.api.adaptive", "flowdiff.api.inversion",
                                    "flowdiff.api.stochastic", "flowdiff.api.fixed_point",
                                    "flowdiff.engine.formulations"])
def test_the_diffusion_layer_does_not_import_its_entry_points_back(module):
    graph = _edges(_modules())
    assert "flowdiff" not in graph[module], f"{module} imports the flowdiff package, which imports it"


# The layers of flowdiff/, lowest first: a module imports only from its own layer or the ones below
# (and solvers/, which is below all of them). The package's __init__ (the public surface) and
# __main__ sit on top.
LAYERS = ("engine", "api", "models", "tools", "runs", "cli")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "flowdiff" or len(parts) < 2 or parts[1] in ("__main__",):
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def _upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for module, targets in graph.items():
        here = _layer(module)
        if here is None:
            continue
        for target in targets:
            there = _layer(target)
            if there is not None and there > here:
                out.append((module, target))
    return sorted(out)


def test_flowdiff_modules_live_in_a_layer():
    stray = [m for m in _modules() if _layer(m) == -1]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_only_go_down_the_layers():
    upward = _upward_imports(_edges(_modules()))
    assert not upward, f"imports going up the layers {LAYERS} (module -> what it imports): {upward}"


def test_the_layer_checker_sees_an_upward_import():
    graph = {"flowdiff.engine.flow": {"flowdiff.api.sampling"}, "flowdiff.api.sampling": {"flowdiff.engine.flow"}}
    assert _upward_imports(graph) == [("flowdiff.engine.flow", "flowdiff.api.sampling")]


def test_no_folder_holds_more_than_15_modules():
    crowded = {str(folder.relative_to(ROOT)): n for package in PACKAGES
               for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]
               if (n := len([f for f in folder.glob("*.py") if f.name != "__init__.py"])) > 15}
    assert not crowded, f"folders with more than 15 modules: {crowded}"


# One place turns a σ grid around: flowdiff.engine.grids.reversed_grid (used by Grid.solve_sigmas and by every
# decode of a stored grid). Above the engine, a reversal ([::-1], flip, reversed()) of anything named like a
# σ grid is a second place, and the floors above the engine are scanned for one.
_GRID_NAME = re.compile(r"sigma|grid|^(sig|enc|gen|ts|times|timesteps|levels)$", re.IGNORECASE)
_FLIPS = {"flip", "flipud", "fliplr"}


def _reversed_operand(node: ast.AST) -> ast.AST | None:
    """The expression ``node`` reverses, or None: ``e[::-1]``, ``np.flip(e)``/``e.flip(...)``, ``reversed(e)``."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
        s = node.slice
        step = s.step
        if (s.lower is None and s.upper is None and isinstance(step, ast.UnaryOp) and isinstance(step.op, ast.USub)
                and isinstance(step.operand, ast.Constant) and step.operand.value == 1):
            return node.value
    if isinstance(node, ast.Call):
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id == "reversed" and node.args:
            return node.args[0]
        if isinstance(fn, ast.Attribute) and fn.attr in _FLIPS:
            is_module = isinstance(fn.value, ast.Name) and fn.value.id in ("np", "numpy", "torch")
            return (node.args[0] if node.args else None) if is_module else fn.value
    return None


def _grid_reversals(source: str) -> list[tuple[int, str]]:
    """(line, expression) of each reversal of something named like a σ grid (a name or attribute matching
    :data:`_GRID_NAME` inside the reversed expression)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        operand = _reversed_operand(node)
        if operand is None:
            continue
        names = [n.id for n in ast.walk(operand) if isinstance(n, ast.Name)]
        names += [n.attr for n in ast.walk(operand) if isinstance(n, ast.Attribute)]
        if any(_GRID_NAME.search(name) for name in names):
            out.append((node.lineno, ast.unparse(node)))
    return sorted(out)


def test_only_the_engine_reverses_a_sigma_grid():
    found = {str(path.relative_to(ROOT)): hits for layer in LAYERS[1:]
             for path in sorted((ROOT / "flowdiff" / layer).rglob("*.py"))
             if (hits := _grid_reversals(path.read_text(encoding="utf-8")))}
    assert not found, ("σ grids reversed outside the engine (use flowdiff.engine.grids.reversed_grid, or "
                       f"Grid.solve_sigmas): {found}")


def test_the_reversal_checker_sees_a_planted_reversal_and_nothing_else():
    planted = """
sig = np.asarray(latent.sigmas, dtype=np.float64)[::-1].copy()
enc = gen[::-1].copy()
out = encode(flow, x, grid=grid[::-1].copy())
back = np.flip(request.sigmas)
again = list(reversed(ts))
flipped = sigmas.flip(0)
"""
    assert [line for line, _ in _grid_reversals(planted)] == [2, 3, 4, 5, 6, 7]
    unrelated = """
path = np.array(path[::-1])
image = images.flip(-1)
files = sorted(folders, key=len, reverse=True)
tail = sigmas[1:]
every_other = sigmas[::2]
grid = reversed_grid(latent.sigmas)
same = np.array_equal(given, latent.sigmas)
"""
    assert _grid_reversals(unrelated) == []
