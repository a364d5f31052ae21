"""The package's floors (ARCHITECTURE.md), checked on the source with `ast`: every module imports
only from its own floor or the floors below, the imports form no cycle, no import of the
package hides inside a function (a lazy import is for an optional dependency), and inference
stays light (no training core, no Accelerate)."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "translate"

# Lowest first. A module belongs to the first floor with a prefix matching its dotted name.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("translate.errors", "translate.files", "translate.precision", "translate.version")),
    ("settings", ("translate.config",)),
    ("core", ("translate.core",)),
    ("parts", ("translate.nets", "translate.data", "translate.augment", "translate.images",
               "translate.viz")),
    ("methods", ("translate.methods",)),
    ("recipe", ("translate.recipe",)),
    ("infer", ("translate.infer",)),
    ("stages", ("translate.export", "translate.onnx_export", "translate.reference",
                "translate.eval", "translate.explore", "translate.runner")),
    ("programs", ("translate.demo",)),
    ("face", ("translate.cli", "translate.__main__", "translate")),
]
# Where an import inside a function of the package's own modules is the point: the face loads
# only what the command given needs (`translate apply` must not pay for training).
LAZY_ALLOWED = ("translate.cli", "translate")
# What `import translate.infer` may never load, directly or through another module.
NOT_FOR_INFERENCE = ("translate.core", "translate.methods", "translate.recipe", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module}: on no floor; add it to FLOORS in tests/test_layers.py "
                         "and to ARCHITECTURE.md")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for each import of the package or of a
    third-party top-level name; type-checking-only imports are not imports at run time."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((resolve(a.name) if a.name.startswith("translate") else a.name,
                              in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in child.names:
                    full = f"{base}.{a.name}"
                    target = full if full in modules else base
                    found.append((resolve(target) if target.startswith("translate") else target,
                                  in_function, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


@functools.cache
def package_graph() -> tuple[dict[str, list[tuple[str, bool, int]]], dict[str, Path]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: list(dict.fromkeys(imports(p, set(paths)))) for m, p in paths.items()}, paths


def broken_rules(graph: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    """One line per import that breaks a floor rule, naming the rule."""
    broken = []
    for module, found in sorted(graph.items()):
        mine = floor_of(module)
        for target, in_function, line in found:
            if not target.startswith("translate") or target == module:
                continue
            theirs = floor_of(target)
            where = f"{module}:{line} imports {target}"
            if theirs > mine:
                broken.append(f"floors import only downward: {where} "
                              f"({FLOORS[mine][0]} -> {FLOORS[theirs][0]})")
            if in_function and module not in LAZY_ALLOWED:
                broken.append(f"no package import hidden in a function (only optional "
                              f"dependencies are imported lazily): {where}")
    return broken


def cycles(graph: dict[str, list[tuple[str, bool, int]]]) -> list[list[str]]:
    """The import cycles among the package's modules (each as a path that returns to its start),
    by depth-first search over module-level and function-level imports alike."""
    edges = {m: sorted({t for t, _, _ in found if t in graph and t != m})
             for m, found in graph.items()}
    found_cycles, state, stack = [], {}, []

    def walk(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == "open":
                found_cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            walk(m)
    return found_cycles


def reachable(graph: dict[str, list[tuple[str, bool, int]]], start: str) -> dict[str, str]:
    """Every module (and third-party top-level name) loaded by importing `start`, mapped to the
    module that imported it. A package's __init__ runs before its submodules, so it counts."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        m = todo.pop()
        parents = [m.rsplit(".", i)[0] for i in range(1, m.count(".") + 1)]
        # What runs at import: module-level imports (a function's run only when called).
        for t, lazy, _ in graph.get(m, []) + [(p, False, 0) for p in parents]:
            if lazy:
                continue
            name = t if t.startswith("translate") else t.split(".")[0]
            if name not in seen:
                seen[name] = m
                if name in graph:
                    todo.append(name)
    return seen


def test_every_module_imports_only_its_own_floor_or_below():
    graph, _ = package_graph()
    assert broken_rules(graph) == []


def test_the_package_has_no_import_cycle():
    graph, _ = package_graph()
    found = cycles(graph)
    assert not found, "no import cycles: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("start", ["translate.infer", "translate.infer.load"])
def test_inference_imports_neither_the_training_core_nor_accelerate(start):
    loaded = reachable(package_graph()[0], start)
    heavy = sorted(m for m in loaded if any(m == p or m.startswith(p + ".")
                                            for p in NOT_FOR_INFERENCE))
    assert heavy == [], ("inference is light: " + "; ".join(
        f"{m} (imported by {loaded[m]})" for m in heavy))


def test_inference_really_loads_no_accelerate():
    # The static walk above, confirmed on the interpreter: what `import translate.infer` and
    # the `translate apply` path leave in sys.modules.
    code = ("import sys, translate.infer, translate.cli as c; "
            "c.parser(); "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'accelerate' "
            "or m.startswith(('translate.core', 'translate.methods'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ the checker itself


def test_the_checker_names_an_upward_import(tmp_path):
    graph = {"translate.core.loop": [("translate.methods", False, 3)],
             "translate.methods": []}
    expected = ("floors import only downward: translate.core.loop:3 imports translate.methods "
                "(core -> methods)")
    assert broken_rules(graph) == [expected]


def test_the_checker_names_a_hidden_import_and_a_cycle():
    graph = {"translate.eval.evaluate": [("translate.export", True, 9)],
             "translate.export": [("translate.eval.evaluate", False, 2)]}
    expected = ("no package import hidden in a function (only optional dependencies are "
                "imported lazily): translate.eval.evaluate:9 imports translate.export")
    assert broken_rules(graph) == [expected]
    assert cycles(graph) == [["translate.eval.evaluate", "translate.export",
                              "translate.eval.evaluate"]]


def test_the_checker_reads_relative_and_type_checking_imports(tmp_path):
    path = PACKAGE / "core" / "loop.py"
    found = {t for t, _, _ in imports(path, set(package_graph()[1]))}
    assert "translate.core.checkpoint" in found and "accelerate" in found
    assert not any(t.startswith("translate.methods") for t in found)


# ------------------------------------------------------------------ methods own their behaviour


def method_name_comparisons(path: Path, names: set[str], root: Path = PACKAGE.parent
                            ) -> list[str]:
    """`x == "cgan"`, `x in ("cgan", "infogan")`, ... in a file: each as "file:line"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
                break
    return found


def test_no_method_name_is_compared_outside_the_methods():
    from translate.methods import METHODS

    names = set(METHODS)
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if "methods" not in p.parts
             for hit in method_name_comparisons(p, names)]
    assert found == [], ("a method owns its behaviour (a field or hook of its registry entry, "
                         "translate/methods/), no comparison of its name: " + ", ".join(found))


def test_the_method_name_check_finds_a_comparison(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text('if cfg.method in ("cgan", "x"):\n    pass\nok = kind == "toy"\n')
    assert method_name_comparisons(path, {"cgan", "infogan"}, tmp_path) == ["probe.py:1"]
