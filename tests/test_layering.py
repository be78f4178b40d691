"""Arrows point down: every package or module of slmforge sits in one layer (LAYERS, the one place
they are declared) and imports only from its own layer or lower ones; and no unit imports one that
(directly or not) imports it back."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slmforge"


# Bottom to top. A unit may import units of its own layer or of lower ones, never of a higher one.
LAYERS = [
    ("foundation", {"errors", "fileio", "formatting", "arguments", "config", "runtime"}),
    ("text", {"text"}),
    ("representations", {"tokenizer", "models", "curate"}),
    ("objectives and data", {"objectives", "data"}),
    ("run folders", {"checkpoint"}),
    ("inference", {"inference"}),
    ("training", {"train"}),
    ("verbs", {"finetune", "distill", "eval", "interop", "report", "quickstart", "serve"}),
    ("command line", {"cli", "__main__", "__init__"}),
]


def layer_of(unit: str) -> int:
    for index, (_, units) in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"slmforge.{unit} is in no layer: add it to LAYERS in tests/test_layering.py")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Top-level unit (a subpackage or a module of slmforge) -> the units it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in package.rglob("*.py"):
        unit = path.relative_to(package).parts[0].removesuffix(".py")
        graph[unit]  # every unit, importing or not
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "slmforge":  # from slmforge import checkpoint
                names = [f"slmforge.{alias.name}" for alias in node.names  # modules, not e.g. __version__
                         if (package / alias.name).is_dir() or (package / f"{alias.name}.py").is_file()]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "slmforge" and len(parts) > 1 and parts[1] != unit:
                    graph[unit].add(parts[1])
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a (layer) -> b (higher layer)` for every import that points up."""
    return [f"{unit} ({LAYERS[layer_of(unit)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
            for unit, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(unit)]


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
        assert not graph[low] & {"train", "eval", "checkpoint", "data", "interop", "runtime", "cli"}, (low, graph[low])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_layers():
    graph = import_graph()
    for unit in graph:
        layer_of(unit)  # every unit is placed
    assert not upward_imports(graph), "\n".join(upward_imports(graph))


def test_an_import_from_a_lower_layer_to_a_higher_one_fails(tmp_path):
    """A planted upward import (the model code reaching into training) is found by the same scan."""
    package = tmp_path / "slmforge"
    (package / "models").mkdir(parents=True)
    (package / "train").mkdir()
    (package / "models" / "decoder.py").write_text("from slmforge.train.trainer import Trainer\n")
    (package / "train" / "trainer.py").write_text("from slmforge import models\n")
    found = upward_imports(import_graph(package))
    assert found == ["models (representations) -> train (training)"]


def test_the_run_folder_package_may_not_reach_into_training(tmp_path):
    """checkpoint/ sits below train/ (and inference/): a writer that needed the process group would be found."""
    package = tmp_path / "slmforge"
    (package / "checkpoint").mkdir(parents=True)
    (package / "train").mkdir()
    (package / "checkpoint" / "writing.py").write_text("from slmforge.train.parallel import barrier\n")
    (package / "train" / "parallel.py").write_text("from slmforge.checkpoint.reading import open_run\n")
    assert upward_imports(import_graph(package)) == ["checkpoint (run folders) -> train (training)"]


def test_model_code_compares_no_family_names():
    """Family facts live in configs and presets (switches); the model modules read switches only."""
    import re

    for name in ("decoder.py", "encoder.py", "layers.py", "heads.py", "documents.py"):
        text = (PACKAGE / "models" / name).read_text(encoding="utf-8")
        assert not re.search(r"family\s*(==|!=|in\b|not in\b)", text), name
