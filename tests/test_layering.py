"""Arrows point down: no package of slmforge imports one that (directly or not) imports it back."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slmforge"


def import_graph() -> dict[str, set[str]]:
    """Top-level unit (a subpackage or a module of slmforge) -> the units it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "slmforge" and len(parts) > 1 and parts[1] != unit:
                    graph[unit].add(parts[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_packages():
    graph = import_graph()
    assert graph["train"] and graph["eval"]  # the scan sees imports at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_models_and_objectives_know_nothing_of_training_files_or_devices():
    graph = import_graph()
    for low in ("models", "objectives", "text"):
        assert not graph[low] & {"train", "eval", "runs", "data", "interop", "runtime", "cli"}, (low, graph[low])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
