"""The package's structure as docs/architecture.md draws it, kept true: every module listed once,
in an order where each imports only modules listed above it (so no import circle either), no
production module reaching the test oracle, and no function over 60 lines of code. (That adding
adapters loads neither the gradient engine nor the initialisers is checked in a fresh interpreter
by tests/adapters/test_inject.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "fastlora"
DOC = ROOT / "docs" / "architecture.md"
GENERATED = {"fastlora._build_info"}  # written by the build
COMPILED = {"fastlora._C"}  # the extension: imports nothing of fastlora (neither do build outputs)
MAX_CODE_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _documented() -> dict[str, set[str]]:
    """docs/architecture.md's module rows, lowest first: module -> the fastlora modules its
    *imports* column names."""
    rows = re.findall(r"^\|\s*`(fastlora[\w.]*)`\s*\|([^|]*)\|", DOC.read_text(), flags=re.M)
    assert rows, "docs/architecture.md has no module table"
    names = [m for m, _ in rows]
    repeated = sorted({m for m in names if names.count(m) > 1})
    assert not repeated, f"listed twice in docs/architecture.md: {repeated}"
    return {m: {n if n == "fastlora" else f"fastlora.{n}" for n in re.findall(r"[\w.]+", cell)} for m, cell in rows}


def _imports(name: str) -> set[str]:
    """fastlora modules ``name`` imports anywhere in its file (module level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in set(MODULES) | COMPILED | GENERATED else base
                         for a in node.names)
    return {m for m in found if m in MODULES and m != name and m not in GENERATED}


def test_every_module_is_documented_once():
    order = list(_documented())
    tree = set(MODULES) - GENERATED
    assert set(order) == tree, (f"in the tree, not in docs/architecture.md: {sorted(tree - set(order))}; "
                                f"in docs/architecture.md, not in the tree: {sorted(set(order) - tree)}")


def test_each_documented_row_names_exactly_what_the_module_imports():
    wrong = [f"{m}: the row says {sorted(said)}, the code imports {sorted(_imports(m))}"
             for m, said in _documented().items() if m in MODULES and said != _imports(m)]
    assert not wrong, "docs/architecture.md's imports column is out of date:\n" + "\n".join(wrong)


def test_every_import_points_down():
    rank = {m: i for i, m in enumerate(_documented())}  # rows of modules not in the tree: the test above
    upward = [f"{m} imports {t}" for m in rank if m in MODULES for t in sorted(_imports(m))
              if rank.get(t, -1) >= rank[m]]
    assert not upward, ("imports of a module listed at or above the importer in docs/architecture.md:\n"
                        + "\n".join(upward))


def test_no_production_module_imports_the_oracle():
    production = [m for m in MODULES if not m.startswith("fastlora.testing")]
    reaching = [f"{m} imports {t}" for m in production for t in _imports(m) if t.startswith("fastlora.testing")]
    assert not reaching, reaching


def _code_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        if len(body) == 1:
            return 0
        first = body[1]
    return sum(1 for line in lines[first.lineno - 1 : node.end_lineno]
               if line.strip() and not line.strip().startswith("#"))


def test_no_function_is_longer_than_60_lines_of_code():
    long = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(lines, node) > MAX_CODE_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_code_lines(lines, node)} lines)")
    assert not long, (f"functions over {MAX_CODE_LINES} lines of code (docstrings, blank and comment lines not "
                      "counted):\n" + "\n".join(long))
