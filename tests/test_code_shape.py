"""The shape of the code: no function in the library, the storage engine or the CLI runs over 80 lines.

A function that long does several jobs; split it where the jobs meet (see retrieval/training:
settings, data, one epoch, evaluation, processes, schedule). Lines count from the `def` (or its
first decorator) to the function's last line, docstring and comments included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("retrieval", "indexer", "cli")
MAX_LINES = 80


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function or method in `source` longer than `limit` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                length = child.end_lineno - first + 1
                if length > limit:
                    found.append((prefix + child.name, first, length))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_checker_measures_functions_methods_and_nested_ones():
    def body(n: int, indent: str) -> str:
        return "\n".join(f"{indent}x{i} = {i}" for i in range(n))

    source = "\n".join([
        "@decorator", "def decorated():", body(79, "    "),  # 81 lines with its decorator
        "def exactly_80():", body(79, "    "),
        "class C:", "    def method(self):", body(80, "        "),  # 81
        "def outer():", "    def inner():", body(80, "        "),  # inner 81, outer 82
    ])
    assert long_functions(source) == [("decorated", 1, 81), ("C.method", 163, 81), ("outer", 244, 82), ("outer.inner", 245, 81)]


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_is_over_80_lines(folder):
    too_long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, line, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not too_long, "split these functions where their jobs meet:\n" + "\n".join(too_long)
