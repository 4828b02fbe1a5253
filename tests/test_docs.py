"""The docs stay in step with the code: every `file.py::name` a page cites exists, every equation names a test,
every figure and link resolves, every generated block has been generated. Reads files only (ast, no imports of the
cited modules), so it takes well under a second; it does not run docs/make_figures.py."""

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
WALKTHROUGH = [DOCS / "walkthrough.md"] + sorted(DOCS.glob("0*.md"))  # the pages of the walkthrough itself

REF = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.py)::([\w.:]+)(?:\[[^\]`]*\])?`")
MATH = re.compile(r"^```math\n.*?^```\n", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
BLOCK = re.compile(r"<!-- make_figures:([\w-]+) -->\n(.*?)<!-- /make_figures:\1 -->", re.S)


def refs(text):
    """[(file, dotted name)] of every `path.py::Name.attr` (or pytest-style `path.py::Class::test[param]`)."""
    return [(f, name.replace("::", ".")) for f, name in REF.findall(text)]


@lru_cache(maxsize=None)
def defined_names(path: Path) -> dict:
    """{top-level name: {names defined in its class body}} of a Python file (functions, classes, assignments)."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def names_in(body):
        out = {}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[node.name] = {}
            elif isinstance(node, ast.ClassDef):
                out[node.name] = names_in(node.body)
            elif isinstance(node, ast.Assign):
                out.update({t.id: {} for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out[node.target.id] = {}
        return out

    return names_in(tree.body)


def check_ref(file, dotted):
    """None if `file` exists and defines `dotted` (Class.method or a function), else what is missing."""
    path = ROOT / file
    if not path.is_file():
        return f"{file}: no such file"
    scope = defined_names(path)
    for part in dotted.split("."):
        if part not in scope:
            return f"{file}::{dotted}: {part!r} is not defined there"
        scope = scope[part]
    return None


def test_the_walkthrough_pages_exist_and_cite_code():
    assert (DOCS / "walkthrough.md").is_file() and len(WALKTHROUGH) >= 6
    for page in WALKTHROUGH[1:]:
        assert refs(page.read_text()), f"{page.name} cites no code"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_cited_file_function_class_and_test_exists(page):
    bad = [msg for f, name in refs(page.read_text()) if (msg := check_ref(f, name))]
    assert not bad, f"{page.name} cites names that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", WALKTHROUGH, ids=lambda p: p.name)
def test_every_equation_names_its_code_and_a_test(page):
    """Each ```math block is followed by a line `Code: `file.py::name` · Test: `tests/test_x.py::test_y``."""
    text = page.read_text()
    for m in MATH.finditer(text):
        line = text[m.end() :].lstrip("\n").split("\n", 1)[0]
        where = f"{page.name} line {text[: m.start()].count(chr(10)) + 1}"
        assert line.startswith("Code:"), f"{where}: equation not followed by a 'Code: ... · Test: ...' line"
        cited = refs(line)
        assert any(f.startswith("tests/") and n.split(".")[-1].startswith("test_") for f, n in cited), (
            f"{where}: the Code/Test line names no test"
        )
        assert any(not f.startswith("tests/") for f, _ in cited), f"{where}: the Code/Test line names no code"


def test_the_refs_checker_can_fail():
    assert check_ref("minidiff/schedule.py", "Schedule.q_sample") is None
    assert check_ref("minidiff/schedule.py", "Schedule.q_sampel") is not None
    assert check_ref("tests/test_schedule.py", "test_no_such_test") is not None
    assert check_ref("minidiff/nothing.py", "f") is not None
    assert refs("`tests/test_a.py::test_b[x-1]` and `a/b.py::C::d`") == [
        ("tests/test_a.py", "test_b"),
        ("a/b.py", "C.d"),
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_figures_resolve(page):
    missing = [
        target
        for target in LINK.findall(page.read_text())
        if "://" not in target and not target.startswith("mailto:") and not (page.parent / target).exists()
    ]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_generated_blocks_are_filled_and_made_by_make_figures():
    """Every block make_figures.py writes has its markers in the page it names, with content between them."""
    src = (DOCS / "make_figures.py").read_text()
    calls = re.findall(r'replace_block\("([\w.-]+)", "([\w-]+)"', src)
    assert calls
    for page, name in calls:
        blocks = dict(BLOCK.findall((DOCS / page).read_text()))
        assert name in blocks, f"{page}: no generated block {name!r}"
        assert blocks[name].strip(), f"{page}: block {name!r} is empty: run python docs/make_figures.py"
    figures = set(re.findall(r'FIGURES / f?"([\w{}.-]+)"', src))
    cited = {Path(t).name for p in WALKTHROUGH for t in LINK.findall(p.read_text()) if t.startswith("figures/")}
    assert cited, "the walkthrough shows no figure"
    for name in cited:
        assert (DOCS / "figures" / name).is_file(), f"docs/figures/{name} missing: run python docs/make_figures.py"
    assert figures  # the script names the files it writes


def test_readme_links_the_walkthrough():
    assert "docs/walkthrough.md" in (ROOT / "README.md").read_text()


def test_the_miniatures_numbers_are_those_of_the_shipped_model():
    """docs/06-what-trains.md's miniature tables (tensors, parameters, shares, file sizes) equal what make_figures.py
    computes now from the weights shipped in minidiff/assets/tiny-sdxl: replacing the miniature without rerunning
    `python docs/make_figures.py` fails here. (Unlike the tests above this one loads the miniature: ~2 s.)"""
    import sys

    sys.path.insert(0, str(DOCS))
    try:
        import make_figures
    finally:
        sys.path.remove(str(DOCS))
    modes, attn = make_figures.what_trains_table(make_figures.miniature_components)
    blocks = dict(BLOCK.findall((DOCS / "06-what-trains.md").read_text()))
    assert blocks["what-trains-miniature"].strip() == modes.strip(), "run python docs/make_figures.py"
    assert blocks["trainable-attn-miniature"].strip() == f"```text\n{attn}\n```", "run python docs/make_figures.py"
