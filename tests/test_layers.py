"""The package imports downward only and has no import circles (docs/architecture.md, "Layers").

Every import counts, those inside functions too, and so does ``importlib.import_module("lcmserve...")``
with a literal name: a circle hidden behind a function-local import is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lcmserve

# Floors, lowest first. A module may import its own group (its subpackage, or the core modules
# among themselves) and any group on a lower floor; distill and server share a floor and stay
# apart. eval sits above shapes: its judges read the bundled domain's scenes and classifier.
FLOORS = {
    "lcmserve": 1, "lcmserve.consistency": 1, "lcmserve.errors": 1,
    "lcmserve.models": 2,
    "lcmserve.engine": 3,
    "lcmserve.distill": 4, "lcmserve.server": 4,
    "lcmserve.shapes": 5,
    "lcmserve.eval": 6,
    "lcmserve.cli": 7,
}
CORE = ("lcmserve", "lcmserve.consistency", "lcmserve.errors")


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under the package folder ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module an import of ``name`` runs: the name itself, else its longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node):
            names = [node.args[0].value]
        for name in names:
            if name == package or name.startswith(package + "."):
                target = _target(name, modules)
                if target and target != module:
                    found.add(target)
    return found


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return (called in ("import_module", "__import__") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def group_of(module: str, floors: dict[str, int]) -> str:
    """The longest entry of ``floors`` that ``module`` is or lies under."""
    best = max((g for g in floors if module == g or module.startswith(g + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS")
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check_layers(root: Path, package: str, floors: dict[str, int], core: tuple[str, ...] = ()) -> list[str]:
    """Every upward or sideways import between groups, and every import circle, as a line each."""
    modules = module_names(root, package)
    graph = {m: imports_of(m, path, modules, package) for m, path in modules.items()}
    problems = []
    for module, targets in sorted(graph.items()):
        here = group_of(module, floors)
        for target in sorted(targets):
            there = group_of(target, floors)
            same = here == there or (here in core and there in core)
            if not same and floors[there] >= floors[here]:
                kind = "upward" if floors[there] > floors[here] else "sideways"
                problems.append(f"{kind} import: {module} (floor {floors[here]}) -> {target} "
                                f"(floor {floors[there]})")
    for cycle in _cycles(graph):
        problems.append("import circle: " + " <-> ".join(cycle))
    return problems


def test_the_package_imports_downward_only_and_has_no_circles():
    root = Path(lcmserve.__file__).parent
    assert check_layers(root, "lcmserve", FLOORS, CORE) == []


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", "low/__init__.py": "", "high/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


FAKE_FLOORS = {"pkg": 1, "pkg.low": 2, "pkg.side": 2, "pkg.high": 3}


def test_the_checker_finds_an_upward_import_hidden_in_a_function(tmp_path):
    root = _fake_package(tmp_path, {
        "low/a.py": "def f():\n    from pkg.high.b import g\n    return g\n",
        "high/b.py": "import pkg.low.a\n\ndef g():\n    return 1\n",
    })
    problems = check_layers(root, "pkg", FAKE_FLOORS)
    assert "upward import: pkg.low.a (floor 2) -> pkg.high.b (floor 3)" in problems
    assert "import circle: pkg.high.b <-> pkg.low.a" in problems
    assert len(problems) == 2


def test_the_checker_finds_import_module_calls_sideways_imports_and_same_floor_circles(tmp_path):
    root = _fake_package(tmp_path, {
        "low/a.py": "import importlib\n\ndef f():\n    return importlib.import_module('pkg.high')\n",
        "low/b.py": "from . import c\n",
        "low/c.py": "from pkg.low import b\n",
        "side/__init__.py": "",
        "side/d.py": "from ..low import c\n",
        "low/e.py": "from pkg.side import d\n",
    })
    problems = check_layers(root, "pkg", FAKE_FLOORS)
    assert problems == [
        "upward import: pkg.low.a (floor 2) -> pkg.high (floor 3)",
        "sideways import: pkg.low.e (floor 2) -> pkg.side.d (floor 2)",
        "sideways import: pkg.side.d (floor 2) -> pkg.low.c (floor 2)",
        "import circle: pkg.low.b <-> pkg.low.c",
    ]


def test_a_clean_fake_package_passes(tmp_path):
    root = _fake_package(tmp_path, {"low/a.py": "import pkg\n", "high/b.py": "from pkg.low.a import *\n"})
    assert check_layers(root, "pkg", FAKE_FLOORS) == []
