"""Generic manifest CSV for in-house data (e.g. DICOMs exported from a PACS).

Required columns: `patient_id, side, view, path`; `path` is relative to the CSV's folder (absolute paths are
accepted too). Every other column is kept as a label column. Errors name the CSV, the row (1-based data row and
file line) and the problem, so a hospital team can fix the file without reading code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import NO_SIDE, UNKNOWN_VIEW, finish_table, read_label_file
from tlese.vocab import OTHER_VIEWS, View, side_code, view_code

REQUIRED_COLUMNS = ("patient_id", "side", "view", "path")
DEFAULT_NAME = "manifest.csv"
CXR_VIEWS = frozenset({UNKNOWN_VIEW, "PA", "AP", "LL", "LATERAL"})


def _where(csv_path: Path, index: int) -> str:
    # index is 0-based over data rows; the header is line 1
    return f"{csv_path} row {index + 1} (line {index + 2})"


def _check_side_view(csv_path: Path, index: int, side: str, view: str, modality: str) -> tuple[str, str]:
    if modality == "cxr":
        if side and side_code(side) is None:
            raise ValueError(f"{_where(csv_path, index)}: side {side!r} must be empty for chest X-rays")
        if view.upper() not in CXR_VIEWS:
            valid = ", ".join(sorted(CXR_VIEWS - {UNKNOWN_VIEW}))
            raise ValueError(f"{_where(csv_path, index)}: view {view!r} is not one of {valid} or empty")
        return NO_SIDE, view.upper()
    side_given, code = side_code(side), view_code(view)
    if side_given is None:
        raise ValueError(f"{_where(csv_path, index)}: side {side!r} is not one of L, R (or LEFT, RIGHT)")
    if code is None:
        valid = [member.value for member in View] + sorted(OTHER_VIEWS)
        raise ValueError(f"{_where(csv_path, index)}: view {view!r} is not one of {', '.join(valid)}")
    return side_given, code


@register_adapter("manifest")
def load_manifest(
    root: str | Path,
    modality: str = "mammo",
    label_column: str = "label",
    dataset: str = "manifest",
    check_files: bool = True,
) -> pd.DataFrame:
    """Load a manifest CSV (`root` is the CSV, or a folder holding `manifest.csv`).

    `label_column` names the column copied into `label` (left empty when the CSV has no such column).
    Rows with an empty patient_id or path, a bad side/view, or a missing file raise ValueError/FileNotFoundError.
    """
    csv_path = Path(root)
    if csv_path.is_dir():
        csv_path = csv_path / DEFAULT_NAME
    frame = read_label_file(csv_path, required=REQUIRED_COLUMNS)
    if frame.empty:
        raise ValueError(f"{csv_path}: the manifest has no rows")
    base = csv_path.parent
    sides, views, paths = [], [], []
    for index, row in enumerate(frame.itertuples(index=False)):
        record = row._asdict()
        if not record["patient_id"]:
            raise ValueError(f"{_where(csv_path, index)}: empty patient_id")
        if not record["path"]:
            raise ValueError(f"{_where(csv_path, index)}: empty path")
        side, view = _check_side_view(csv_path, index, record["side"], record["view"], modality)
        path = Path(record["path"])
        path = (path if path.is_absolute() else base / path).resolve()
        if check_files and not path.is_file():
            raise FileNotFoundError(f"{_where(csv_path, index)}: image file not found: {path}")
        sides.append(side)
        views.append(view)
        paths.append(str(path))
    frame["side"], frame["view"], frame["path"] = sides, views, paths
    return finish_table(
        frame,
        dataset=dataset,
        modality=modality,
        label_column=label_column if label_column in frame.columns else None,
        source=csv_path,
    )
