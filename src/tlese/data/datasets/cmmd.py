"""CMMD (TCIA): DICOM tree `CMMD/<ID1>/<study dir>/<series dir>/1-1.dcm, 1-2.dcm, ...` + clinical file.

The file names do not say which breast or view an image shows, so both come from the DICOM header
(ImageLaterality / ViewPosition / ViewCodeSequence via `tlese.data.io.read_header`). The patient is the
first folder on the path named like a clinical ID1; trees ordered by study UID instead
(`CMMD/<study uid>/1-N.dcm`, as some mirrors store them) fall back to the DICOM PatientID, which CMMD sets
to the same pseudonymous ID1. The clinical file
`CMMD_clinicaldata_revision.xlsx` (or its CSV twin) has one row per breast: ID1, LeftRight, Age, number,
abnormality, classification, subtype. A header side that contradicts the clinical file is an error naming the
file; a patient with one clinical row must have images of that side only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pydicom

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import finish_table, normalize_side, read_label_file
from tlese.data.io import ImageReadError, check_header_against, read_header

CLINICAL_COLUMNS = ("ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype")
CLINICAL_FILE_NAMES = ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv", "cmmd_labels.csv")
SUBTYPES = ("Luminal A", "Luminal B", "HER2-enriched", "triple negative")
# Spellings seen in CMMD derivatives and papers -> the names used by the clinical file (and by tasks).
_SUBTYPE_SPELLINGS = {
    re.sub(r"[^a-z0-9]", "", alias.lower()): name
    for name, aliases in {
        "Luminal A": ("Luminal A", "luminal_a", "LumA"),
        "Luminal B": ("Luminal B", "luminal_b", "LumB"),
        "HER2-enriched": ("HER2-enriched", "HER2 enriched", "HER2", "HER2+"),
        "triple negative": ("triple negative", "triple-negative", "TNBC", "TN"),
    }.items()
    for alias in aliases
}
_CLASSIFICATIONS = {"benign": "Benign", "malignant": "Malignant"}


def normalize_subtype(value: str) -> str:
    """'luminal_a' / 'TNBC' / 'HER2 enriched' ... -> the clinical file's name; '' stays ''; unknown text unchanged."""
    text = str(value).strip()
    return _SUBTYPE_SPELLINGS.get(re.sub(r"[^a-z0-9]", "", text.lower()), text) if text else ""


def load_cmmd_labels(path: str | Path) -> pd.DataFrame:
    """Read the CMMD clinical file (xlsx or CSV): one row per breast, strings, subtype/classification normalised.

    Adds `side` (L/R from LeftRight). Raises ValueError naming the file for a missing column, a bad LeftRight,
    or a breast listed twice.
    """
    path = Path(path)
    labels = read_label_file(path, required=CLINICAL_COLUMNS)
    labels["subtype"] = labels["subtype"].map(normalize_subtype)
    labels["classification"] = labels["classification"].map(lambda text: _CLASSIFICATIONS.get(text.lower(), text))
    labels["side"] = labels["LeftRight"].map(normalize_side)
    bad = labels[labels["side"].isna()]
    if len(bad):
        raise ValueError(f"{path} row {bad.index[0] + 1}: LeftRight {bad['LeftRight'].iloc[0]!r} is not L or R")
    duplicated = labels[labels.duplicated(["ID1", "side"])]
    if len(duplicated):
        raise ValueError(f"{path}: breast {duplicated['ID1'].iloc[0]} {duplicated['side'].iloc[0]} is listed twice")
    labels.attrs["source"] = str(path)
    return labels


def find_clinical_file(root: Path) -> Path:
    """The clinical file in `root` or one of its two parents (TCIA puts it beside the `CMMD/` folder)."""
    for folder in (root, *list(root.parents)[:2]):
        for name in CLINICAL_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"{root}: no clinical file ({' or '.join(CLINICAL_FILE_NAMES)}) here or in its parents; "
                            "pass labels=PATH")


def _patient_of(path: Path, root: Path, patients: set[str]) -> str | None:
    for part in path.relative_to(root).parts[:-1]:
        if part in patients:
            return part
    patient_id = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", ""))
    return patient_id.strip() if patient_id.strip() in patients else None


@register_adapter("cmmd")
def load_cmmd(root: str | Path, labels: str | Path | None = None, require_labels: bool = True) -> pd.DataFrame:
    """Load CMMD images under `root` (the folder holding `CMMD/`, or `CMMD/` itself) with their clinical labels.

    One row per DICOM; the patient is the first folder on the path named like a clinical ID1. Columns: contract +
    subtype, classification, abnormality, age, image_id (path relative to root). `label` = subtype ('' for benign
    and D1 breasts: tasks drop and report those). DICOMs of patients absent from the clinical file raise
    ValueError when `require_labels` (default), otherwise they are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CMMD folder not found")
    clinical_path = Path(labels) if labels else find_clinical_file(root)
    clinical = load_cmmd_labels(clinical_path)
    by_breast = {(row.ID1, row.side): row for row in clinical.itertuples(index=False)}
    sides_of = clinical.groupby("ID1")["side"].apply(set).to_dict()
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in (".dcm", ".dicom") and path.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no .dcm files found (expected CMMD/<ID1>/<study>/<series>/1-1.dcm)")
    patients = set(sides_of)
    rows = []
    for path in files:
        patient = _patient_of(path, root, patients)
        if patient is None:
            if require_labels:
                raise ValueError(f"{path}: neither a folder on this path nor the DICOM PatientID is a patient ID1 "
                             f"of {clinical_path}")
            continue
        header = read_header(path)
        known_sides = sides_of[patient]
        # With one clinical row the breast is known: the header must agree with it (or be silent).
        expected_side = next(iter(known_sides)) if len(known_sides) == 1 else None
        check_header_against(header, None, expected_side, path)
        side = header.side or expected_side
        if side is None:
            raise ImageReadError(path, f"no laterality in the header and {patient} has rows for both breasts "
                                       f"in {clinical_path}")
        if (patient, side) not in by_breast:
            raise ImageReadError(path, f"laterality conflict: header says {side}, {clinical_path} lists {patient} "
                                       f"only for {sorted(known_sides)}")
        if header.view is None:
            raise ImageReadError(path, "no view in the header (ViewPosition / ViewCodeSequence)")
        record = by_breast[(patient, side)]
        rows.append(
            {
                "patient_id": patient,
                "side": side,
                "view": header.view,
                "path": str(path.resolve()),
                "subtype": record.subtype,
                "classification": record.classification,
                "abnormality": record.abnormality,
                "age": record.Age,
                "image_id": path.relative_to(root).as_posix(),
            }
        )
    table = finish_table(rows, dataset="cmmd", modality="mammo", label_column="subtype", source=root,
                         extra_columns=("subtype", "classification", "abnormality", "age", "image_id"))
    table.attrs["labels"] = str(clinical_path)
    return table
