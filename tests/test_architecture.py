"""Dependencies run one way: data -> models -> train -> evaluate is the flow, and no area imports one after it.

Imports are read from the source (also those inside functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tlese"
# area -> areas it must never import
FORBIDDEN = {
    "evaluate": ("tlese.train",),
    "data": ("tlese.train", "tlese.evaluate", "tlese.models"),
    "models": ("tlese.train", "tlese.evaluate", "tlese.data"),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_no_area_imports_one_downstream(area):
    offending = []
    for path in sorted((SRC / area).rglob("*.py")):
        for module in imported_modules(path):
            if module.startswith(FORBIDDEN[area]):
                offending.append(f"{path.relative_to(SRC)} imports {module}")
    assert not offending, offending


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
