"""Helpers shared by the dataset adapters: the table contract, label-file reading and value normalisation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import pandas as pd

from tlese.vocab import Side, View

# Every adapter returns at least these columns, in this order, followed by its extra label columns.
TABLE_COLUMNS: tuple[str, ...] = ("patient_id", "side", "view", "path", "label", "dataset", "modality")

MODALITIES = ("mammo", "cxr")

# Chest X-rays carry no breast side, and the public CXR sets do not say PA or AP: both are the empty string
# (meaning "not applicable / unknown"), never NaN, so string comparisons and groupby behave.
NO_SIDE = ""
UNKNOWN_VIEW = ""

_SIDE_ALIASES = {"L": Side.L.value, "LEFT": Side.L.value, "R": Side.R.value, "RIGHT": Side.R.value}
_VIEW_ALIASES = {
    "CC": View.CC.value,
    "CRANIO-CAUDAL": View.CC.value,
    "CRANIOCAUDAL": View.CC.value,
    "MLO": View.MLO.value,
    "MEDIO-LATERAL OBLIQUE": View.MLO.value,
    "MEDIOLATERAL OBLIQUE": View.MLO.value,
}
# Views that exist in mammography practice but that no task here uses; an adapter keeps them, tasks filter them.
OTHER_MAMMO_VIEWS = frozenset({"ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "ISO", "AT"})

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")


def normalize_side(value: object) -> str | None:
    """'L'/'left'/'RIGHT' ... -> 'L' or 'R'; anything else -> None."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return _SIDE_ALIASES.get(str(value).strip().upper())


def normalize_view(value: object) -> str | None:
    """'CC'/'mlo'/'cranio-caudal' ... -> 'CC' or 'MLO'; other known mammography views upper-cased; else None."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip().upper()
    if text in _VIEW_ALIASES:
        return _VIEW_ALIASES[text]
    return text if text in OTHER_MAMMO_VIEWS else None


def clean_text(series: pd.Series) -> pd.Series:
    """Strings stripped of surrounding blanks, missing values as ''."""
    return series.fillna("").astype(str).str.strip()


def read_label_file(path: Path, required: Iterable[str] = ()) -> pd.DataFrame:
    """Read a CSV or Excel label file as strings (IDs like 'D1-0001' or '001' stay text), checking columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    if path.suffix.lower() in (".xlsx", ".xls"):
        frame = pd.read_excel(path, dtype=str, keep_default_na=False)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if len(frame.columns) == 1 and ";" in frame.columns[0]:  # Excel "CSV" in locales with a decimal comma
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=";")
    frame.columns = [str(column).strip() for column in frame.columns]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame.apply(lambda column: column.str.strip())


def finish_table(
    rows: pd.DataFrame | list[dict],
    *,
    dataset: str,
    modality: str,
    label_column: str | None,
    source: str | Path,
    extra_columns: Iterable[str] = (),
) -> pd.DataFrame:
    """Put a table in the adapter contract: contract columns first, `label` copied from `label_column`.

    The table's `attrs` record where it came from (dataset, source folder or file), so anything computed from it
    (folds, caches) can say what data it used.
    """
    table = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows.copy()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    for column in ("patient_id", "side", "view", "path", *([label_column] if label_column else []), *extra_columns):
        if column not in table.columns:  # e.g. a table with no rows at all
            table[column] = pd.Series(dtype=str)
    table["label"] = table[label_column] if label_column else ""
    table["dataset"] = dataset
    table["modality"] = modality
    for column in ("patient_id", "side", "view", "path", "label"):
        table[column] = clean_text(table[column])
    extras = [column for column in extra_columns if column in table.columns and column not in TABLE_COLUMNS]
    extras += [column for column in table.columns if column not in TABLE_COLUMNS and column not in extras]
    table = table[list(TABLE_COLUMNS) + extras].reset_index(drop=True)
    table.attrs["dataset"] = dataset
    table.attrs["source"] = str(source)
    return table


def warn_image_level_ids(dataset: str, root: Path, n_images: int) -> None:
    """Patient IDs taken from file stems make 'patient-level' splits only image-level: say so."""
    warnings.warn(
        f"{dataset} at {root}: the source gives no patient IDs, so each of the {n_images} images is its own "
        "'patient' (patient_id = file stem); folds are then image-level and may leak a patient across folds",
        UserWarning,
        stacklevel=3,
    )


def find_images(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES, skip_dirs: Iterable[str] = ()) -> list[Path]:
    """Image files below `folder` (recursive, sorted), leaving out any folder named in `skip_dirs` (any case)."""
    suffixes = {suffix.lower() for suffix in suffixes}
    skipped = {name.lower() for name in skip_dirs}
    found = []
    for path in Path(folder).rglob("*"):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if skipped and any(part.lower() in skipped for part in path.relative_to(folder).parts[:-1]):
            continue
        found.append(path)
    return sorted(found)
