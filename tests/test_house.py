"""The house rules of minidiff/, read off the source with `ast` (nothing is imported):

- no import circle, counting module-level and function-level imports alike;
- no `_private` name imported from another module;
- no upward import: nothing in minidiff/ imports a script (finetune, sample, train_gan, train_ddpm) or a test.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minidiff"
SCRIPTS = {p.stem for p in ROOT.glob("*.py")} | {"tests", "bench", "docs"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str):
    """[(imported module, [names taken from it], line)] for every import statement in module `name`, at any depth."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule; other names come from pkg itself
            found += [(f"{source}.{n}", [], node.lineno) for n in names if f"{source}.{n}" in MODULES]
            rest = [n for n in names if f"{source}.{n}" not in MODULES]
            if rest:
                found.append((source, rest, node.lineno))
    return found


def graph():
    return {name: sorted({m for m, _, _ in imports(name) if m in MODULES and m != name}) for name in MODULES}


def find_cycle(edges):
    """One import circle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "grey"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "grey":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "black"
        return None

    for node in edges:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_is_found():
    assert {
        "minidiff",
        "minidiff.lora",
        "minidiff.lora.files",
        "minidiff.lora.layers",
        "minidiff.io",
        "minidiff.cli",
    } <= set(MODULES)


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_private_name_imported_across_modules():
    bad = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {n} from {source}"
        for name in MODULES
        for source, names, line in imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__") and source != name
    ]
    assert not bad, "\n".join(bad)


def test_no_upward_import():
    bad = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {source}"
        for name in MODULES
        for source, _, line in imports(name)
        if source.split(".")[0] in SCRIPTS
    ]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------- the checks themselves fail
def test_cycle_finder_finds_a_function_level_circle(tmp_path, monkeypatch):
    fake = {"minidiff.a": tmp_path / "a.py", "minidiff.b": tmp_path / "b.py"}
    fake["minidiff.a"].write_text("from . import b\n")
    fake["minidiff.b"].write_text("def f():\n    from .a import g\n    from ._x import _y\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert find_cycle(graph()) in (
        ["minidiff.a", "minidiff.b", "minidiff.a"],
        ["minidiff.b", "minidiff.a", "minidiff.b"],
    )
    assert ("minidiff._x", ["_y"], 3) in imports("minidiff.b")


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from . import layouts", "minidiff.weights.layouts"),
        ("from ..lora import wrap", "minidiff.lora"),
        ("import finetune", "finetune"),
    ],
)
def test_imports_resolve_relative_names(tmp_path, monkeypatch, source, expected):
    path = tmp_path / "x.py"
    path.write_text(source + "\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {**MODULES, "minidiff.weights.x": path})
    assert expected in [m for m, _, _ in imports("minidiff.weights.x")]
