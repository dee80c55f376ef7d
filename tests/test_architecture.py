"""The shape of the package, read from its source: which area may import which, and no import circle anywhere.

Every import statement counts, also those inside functions (a lazy import hides a circle from Python, not from the
design). The graph has one node per module; `from tlese.a import b` is an edge to `tlese.a.b` when b is a module, to
`tlese.a` otherwise; importing a package is an edge to its `__init__`.
"""

from __future__ import annotations

import ast
import graphlib
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tlese"

# area -> areas it must never reach, directly or through another module
FORBIDDEN = {
    "data": ("tlese.train", "tlese.evaluate", "tlese.models", "tlese.bundle", "tlese.predict", "tlese.serve"),
    "models": ("tlese.train", "tlese.evaluate", "tlese.data", "tlese.bundle", "tlese.predict", "tlese.serve"),
    "evaluate": ("tlese.train", "tlese.predict", "tlese.serve", "tlese.node", "tlese.cluster"),
    "train": ("tlese.serve", "tlese.predict", "tlese.node"),
    "predict": ("tlese.train",),
    "serve": ("tlese.train",),
}
# area -> the only areas it may import (besides itself)
ALLOWED_ONLY = {
    "bundle": ("tlese.data", "tlese.models", "tlese.files", "tlese.vocab"),
}


def module_name(path: Path) -> str:
    parts = ["tlese", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _import_targets(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The tlese modules `path` (module `name`) imports: `import a.b` -> a.b; `from a import b` -> a.b when that is a
    module, else a (relative imports resolved; names that are no module of this tree, e.g. a namespace folder,
    give no edge)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif base in known:
                    found.add(base)
    return {target for target in found if target != name and (target == "tlese" or target.startswith("tlese."))}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """tlese module -> the tlese modules it imports."""
    known = modules()
    return {name: frozenset(_import_targets(path, name, known)) for name, path in known.items()}


def reachable(start: str) -> dict[str, list[str]]:
    """Every module `start` imports directly or through others, with one import chain leading to it."""
    graph, chains, todo = import_graph(), {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for target in sorted(graph[current]):
            if target not in chains:
                chains[target] = [*chains[current], target]
                todo.append(target)
    return chains


def test_the_import_graph_is_read_from_every_import():
    """The graph itself: lazy imports count, `from package import module` points at the module."""
    graph = import_graph()
    assert "tlese.train.cv" in graph["tlese.train.commands"]  # imported inside a function only
    assert "tlese.train.engine" in graph["tlese.train.cv"]  # `from tlese.train import engine`
    assert "tlese.models.spec" in graph["tlese.train.stages"]


def test_no_import_circle_anywhere():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as error:  # listed from a module to its importers; reversed: `a -> b`, a imports b
        pytest.fail(f"import circle: {' -> '.join(reversed(error.args[1]))}")


def _area_modules(area: str) -> list[str]:
    prefix = f"tlese.{area}"
    return [name for name in modules() if name == prefix or name.startswith(prefix + ".")]


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_no_area_reaches_a_forbidden_one(area):
    offending = []
    for name in _area_modules(area):
        for target, chain in reachable(name).items():
            if target.startswith(FORBIDDEN[area]):
                offending.append(" -> ".join(chain))
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("area", sorted(ALLOWED_ONLY))
def test_an_area_imports_only_what_it_may(area):
    allowed = (f"tlese.{area}", *ALLOWED_ONLY[area])
    offending = [f"{name} imports {target}" for name in _area_modules(area) for target in import_graph()[name]
                 if not (target in allowed or target.startswith(tuple(f"{prefix}." for prefix in allowed)))]
    assert not offending, offending


def test_the_version_has_one_home_that_imports_nothing():
    """`tlese.version` imports nothing, so any module may read the version; training reads it there, not through
    the package's `__init__` (which reaches the bundle loader)."""
    graph = import_graph()
    assert graph["tlese.version"] == frozenset() and "tlese.version" in graph["tlese"]
    through_init = [name for name in _area_modules("train") if "tlese" in graph[name]]
    assert not through_init, f"read the version from tlese.version, not the package: {through_init}"


def test_the_run_folder_layout_is_spelled_in_one_module():
    """Run-folder names live in train/rundir.py; everything else asks it."""
    literals = ('"split.csv"', '"fold_info.json"', '"stage1_cxr"', '"stage_summary.json"', 'f"fold_{')
    offending = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "rundir.py":
            continue
        text = path.read_text()
        offending += [f"{path.relative_to(SRC)}: {literal}" for literal in literals if literal in text]
    assert not offending, offending


def test_the_default_image_size_is_written_once():
    """One default input size (tlese.data.preprocess.DEFAULT_IMAGE_SIZE); the training config takes it from there."""
    from tlese.data.preprocess import DEFAULT_IMAGE_SIZE, PreprocessParams
    from tlese.train.config import Experiment

    assert PreprocessParams().size == Experiment().image_size == DEFAULT_IMAGE_SIZE


def test_a_new_dataset_is_one_new_file(tmp_path, monkeypatch):
    """Every module of the datasets package registers itself: nothing else needs editing."""
    import tlese.data.datasets as datasets

    (tmp_path / "inhouse_fixture.py").write_text(
        "from tlese.data.datasets import register_adapter\n\n"
        "@register_adapter('inhouse_fixture')\ndef load(root):\n    return None\n")
    monkeypatch.setattr(datasets, "__path__", [*datasets.__path__, str(tmp_path)])
    monkeypatch.setattr(datasets, "_ADAPTERS", dict(datasets._ADAPTERS))
    datasets._register_all()
    assert "inhouse_fixture" in datasets.list_adapters()
