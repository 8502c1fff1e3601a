"""The package's shape, checked from its source: no import cycle, no private name imported across modules,
no module over 600 lines, no function over 80 lines unless a comment says why it stays whole (issue 13).

Imports are read with `ast`, function-local ones included (they run too, only later). Importing
`a.b.c` also runs the `__init__` of `a` and `a.b`, so those packages count as imported too, except the
importer's own ancestors (Python initialises them before the importer itself).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "quantpipe"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: A function longer than MAX_FUNCTION_LINES carries this comment, with the reason, within its first lines.
WHOLE_MARKER = "# kept whole:"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, "", node.lineno) if sub in modules else (node.module, alias.name, node.lineno)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        own = set(_ancestors(name))
        for target, _, _ in _imports(path, modules):
            if target not in modules:
                continue
            for t in [*_ancestors(target), target]:
                if t in modules and t not in own and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _python_files() -> list[Path]:
    return [p for d in ("quantpipe", "tests", "benchmarks", "tools") for p in sorted((ROOT / d).rglob("*.py"))]


def test_no_private_name_imported_across_modules() -> None:
    modules = _modules()
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases: set[str] = set()  # local names bound to quantpipe modules
        for target, name, line in _imports(path, modules):
            if target.startswith("quantpipe") and name.startswith("_") and not name.startswith("__"):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantpipe"):
                aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("quantpipe")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name: str) -> None:
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (at most {MAX_MODULE_LINES}): split it by job"


def test_long_functions_say_why_they_stay_whole() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(text))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                head = text[node.lineno - 1: node.body[0].lineno + 30]
                if size > MAX_FUNCTION_LINES and not any(WHOLE_MARKER in line and
                                                         len(line.split(WHOLE_MARKER, 1)[1].strip()) > 10
                                                         for line in head):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines without a `{WHOLE_MARKER} <reason>` comment:\n"
                      + "\n".join(long))
