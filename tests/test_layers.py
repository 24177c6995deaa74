"""ember's layer order (DESIGN.md): every import points down the order, and no imports form a cycle.

    errors -> config -> models -> {data, parallel, checkpoint} -> {train, plan, compat, generation}
           -> commands -> cli

Packages on one level may not import each other. Imports inside functions count as much as those at
the top of a module: a lazy import still ties the two layers together. The check reads each file's
`ast`, so it never imports the modules it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ember"

# Lowest first. A unit is a package (or a top-level module); a module belongs to the longest unit
# that prefixes its name.
LAYERS: list[tuple[str, ...]] = [
    ("ember", "ember.errors"),
    ("ember.progress", "ember.file_lock"),  # utilities every layer above may use
    ("ember.config",),
    ("ember.models",),
    ("ember.data", "ember.parallel", "ember.checkpoint"),
    ("ember.train", "ember.plan", "ember.compat", "ember.generation", "ember.evaluation"),
    ("ember.commands",),
    ("ember.cli",),
    ("ember.__main__",),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The ember modules `path` imports anywhere in its body (`from A import B` counts as A.B when
    A.B is a module, else as A; relative imports are resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in known else module)
    return {m for m in found if m == "ember" or m.startswith("ember.")}


def unit_of(module: str) -> str:
    units = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    return max(units, key=len)


def level_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, name, known) & known for name, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import from a unit into the same level or above (other than its own unit)."""
    wrong = []
    for source, targets in graph.items():
        source_unit = unit_of(source)
        for target in targets:
            target_unit = unit_of(target)
            if target_unit != source_unit and level_of(target_unit) >= level_of(source_unit):
                wrong.append(f"{source} -> {target}")
    return sorted(wrong)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_module_belongs_to_a_layer():
    graph = import_graph(ROOT)
    assert len(graph) > 50  # the walk found the package
    for module in graph:
        level_of(unit_of(module))  # raises StopIteration/ValueError for a module outside every layer


def test_imports_point_down_the_layer_order():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_cycles():
    assert import_cycles(import_graph(ROOT)) == []


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "ember" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "ember"


@pytest.mark.parametrize("files, expected", [
    # the upward imports issue 13 found, each on its own
    ({"models/__init__.py": "", "models/convert.py": "from ember.train.export import x\n",
      "train/__init__.py": "", "train/export.py": ""}, ["ember.models.convert -> ember.train.export"]),
    ({"parallel/__init__.py": "", "parallel/gradients.py": "from ember.train import optim\n",
      "train/__init__.py": "", "train/optim.py": ""}, ["ember.parallel.gradients -> ember.train.optim"]),
    ({"parallel/__init__.py": "", "parallel/mesh.py": "def f():\n    from ember.compat import tiny\n",
      "compat/__init__.py": "", "compat/tiny.py": ""}, ["ember.parallel.mesh -> ember.compat.tiny"]),
    ({"compat/__init__.py": "", "compat/tiny.py": "from ember.cli import main\n", "cli.py": ""},
     ["ember.compat.tiny -> ember.cli"]),
    # same level: data and checkpoint may not import each other
    ({"data/__init__.py": "", "data/loader.py": "from ..checkpoint import training\n",
      "checkpoint/__init__.py": "", "checkpoint/training.py": ""}, ["ember.data.loader -> ember.checkpoint.training"]),
])
def test_the_check_catches_upward_imports(tmp_path, files, expected):
    root = _write_tree(tmp_path, {"__init__.py": "", "errors.py": "", **files})
    assert upward_imports(import_graph(root)) == expected


def test_the_check_catches_cycles(tmp_path):
    root = _write_tree(tmp_path, {
        "__init__.py": "", "data/__init__.py": "",
        "data/records.py": "from ember.data import sources\n",
        "data/sources.py": "def f():\n    from ember.data.records import Record\n",
    })
    assert import_cycles(import_graph(root)) == [["ember.data.records", "ember.data.sources"]]
