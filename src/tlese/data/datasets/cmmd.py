"""CMMD (TCIA): DICOM tree `CMMD/<ID1>/<study dir>/<series dir>/1-1.dcm, 1-2.dcm, ...` + clinical file.

The file names do not say which breast or view an image shows, so both come from the DICOM header
(ImageLaterality / ViewPosition / ViewCodeSequence via `tlese.data.io.read_header`). The patient is the
folder on the path named like a CMMD ID1; trees ordered by study UID instead (`CMMD/<study uid>/1-N.dcm`, as
some mirrors store them) fall back to the DICOM PatientID, which CMMD sets to the same pseudonymous ID1. The
clinical file `CMMD_clinicaldata_revision.xlsx` (or its CSV twin) has one row per breast: ID1, LeftRight, Age,
number, abnormality, classification, subtype.

Nothing is guessed and one bad file never stops the load: a file that is not a readable DICOM, whose path names
two patients or whose folder and PatientID name different patients, whose laterality tags disagree with each other
or with the clinical rows of its patient, or that has no view, is left out; so are folders reached twice through
symlinks. Each is listed with its reason in `table.attrs["skipped"]` (path relative to the root), together with
clinical rows that have no image, and a warning gives the count. Reasons name files and pseudonymous ID1s only,
never other header values.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import finish_table, format_skipped, read_label_file, walk_files
from tlese.data.io import DICOM_SUFFIXES, ImageReadError, read_header_and_tags
from tlese.vocab import CMMD_SUBTYPES, side_code

CLINICAL_COLUMNS = ("ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype")
CLINICAL_FILE_NAMES = ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv", "cmmd_labels.csv")
# CMMD patient IDs: D1-0001 ... (cohort 1), D2-0001 ... (cohort 2).
ID1_PATTERN = re.compile(r"^D\d-\d{4}$")
# Files in a TCIA download that are not images and need no mention (hidden files are ignored too).
_NOT_IMAGES = {".xlsx", ".xls", ".csv", ".txt", ".md", ".json", ".tcia", ".pdf", ".html", ".xml"}
# Spellings seen in CMMD derivatives and papers -> the names used by the clinical file (and by tasks).
_SUBTYPE_SPELLINGS = {
    re.sub(r"[^a-z0-9]", "", alias.lower()): name
    for name, aliases in zip(CMMD_SUBTYPES, (  # in the order of CMMD_SUBTYPES
        ("luminal_a", "LumA"),
        ("luminal_b", "LumB"),
        ("HER2 enriched", "HER2", "HER2+"),
        ("triple-negative", "TNBC", "TN"),
    ))
    for alias in (name, *aliases)
}
_CLASSIFICATIONS = {"benign": "Benign", "malignant": "Malignant"}


def normalise_subtype(value: str) -> str:
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
    labels["subtype"] = labels["subtype"].map(normalise_subtype)
    labels["classification"] = labels["classification"].map(lambda text: _CLASSIFICATIONS.get(text.lower(), text))
    labels["side"] = labels["LeftRight"].map(side_code)
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


class _Skip(Exception):
    """One file left out of the table, with its reason."""


def _patient_of(relative: Path, patient_id: str | None, patients: set[str]) -> str | None:
    """The one patient a file belongs to, from its folders and its DICOM PatientID; None when neither names a
    clinical patient; _Skip when they name different ones."""
    folders = list(dict.fromkeys(part for part in relative.parts[:-1] if part in patients or ID1_PATTERN.match(part)))
    if len(folders) > 1:
        raise _Skip(f"the path holds folders of two patients ({', '.join(folders)}): a copied folder? Not used")
    if folders:
        if patient_id and patient_id != folders[0] and patient_id in patients:
            raise _Skip(f"folder {folders[0]} but DICOM PatientID {patient_id}: cannot tell whose image it is")
        return folders[0] if folders[0] in patients else None
    return patient_id if patient_id in patients else None


def _side_of(path_tags: dict, header, patient: str, known_sides: set[str], clinical_name: str) -> str:
    """The breast an image shows: its laterality tags, which must agree with each other and with the clinical
    rows of the patient; with no tag, the patient's only clinical breast."""
    tagged = {keyword: side_code(path_tags.get(keyword)) for keyword in ("ImageLaterality", "Laterality")}
    tagged = {keyword: side for keyword, side in tagged.items() if side}
    if len(set(tagged.values())) > 1:
        said = ", ".join(f"{keyword} says {side}" for keyword, side in tagged.items())
        raise _Skip(f"laterality tags disagree: {said}")
    side = next(iter(tagged.values()), None) or header.side
    source = next(iter(tagged), None) or header.side_source or "header"
    if side is None:
        if len(known_sides) == 1:
            return next(iter(known_sides))
        raise _Skip(f"no laterality in the header and {patient} has rows for both breasts in {clinical_name}")
    if side not in known_sides:
        raise _Skip(f"laterality conflict: DICOM {source} says {side}, {clinical_name} lists {patient} only for "
                    f"{'/'.join(sorted(known_sides))}")
    return side


@register_adapter("cmmd")
def load_cmmd(root: str | Path, labels: str | Path | None = None, require_labels: bool = True) -> pd.DataFrame:
    """Load CMMD images under `root` (the folder holding `CMMD/`, or `CMMD/` itself) with their clinical labels.

    One row per usable DICOM. Columns: contract + subtype, classification, abnormality, age, image_id (path
    relative to root). `label` = subtype ('' for benign and D1 breasts: tasks drop and report those).
    `attrs["skipped"]` lists every file and clinical row left out, as (path relative to root, reason). DICOMs of
    patients absent from the clinical file raise ValueError when `require_labels` (default: the clinical file
    probably does not belong to these images), otherwise they are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CMMD folder not found")
    clinical_path = Path(labels) if labels else find_clinical_file(root)
    clinical = load_cmmd_labels(clinical_path)
    by_breast = {(row.ID1, row.side): row for row in clinical.itertuples(index=False)}
    sides_of = clinical.groupby("ID1")["side"].apply(set).to_dict()
    patients = set(sides_of)
    files, skipped = walk_files(root)
    candidates = []
    for path in files:
        relative = path.relative_to(root)
        if path.suffix.lower() in DICOM_SUFFIXES:
            candidates.append(path)
        elif not path.name.startswith(".") and path.suffix.lower() not in _NOT_IMAGES and path.is_file():
            skipped.append((relative.as_posix(), "not a DICOM file (no .dcm suffix): ignored"))
    if not candidates:
        raise FileNotFoundError(f"{root}: no .dcm files found (expected CMMD/<ID1>/<study>/<series>/1-1.dcm)")

    rows, unknown = [], []
    for path in candidates:
        relative = path.relative_to(root)
        try:
            header, tags = read_header_and_tags(path, ("PatientID", "ImageLaterality", "Laterality"))
            patient = _patient_of(relative, tags["PatientID"], patients)
            if patient is None:
                unknown.append(relative.as_posix())
                continue
            side = _side_of(tags, header, patient, sides_of[patient], clinical_path.name)
            if header.view is None:
                raise _Skip("no view in the header (ViewPosition / ViewCodeSequence)")
        except ImageReadError as error:
            skipped.append((relative.as_posix(), error.reason))
            continue
        except _Skip as reason:
            skipped.append((relative.as_posix(), str(reason)))
            continue
        except Exception as error:  # one unreadable file must not stop the load; report it
            skipped.append((relative.as_posix(), f"cannot read ({type(error).__name__})"))
            continue
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
                "image_id": relative.as_posix(),
            }
        )
    reason = f"neither a folder on this path nor the DICOM PatientID is a patient ID1 of {clinical_path.name}"
    if unknown and require_labels:
        raise ValueError(f"{root / unknown[0]}: {reason} ({len(unknown)} such file(s); wrong clinical file? "
                         "pass require_labels=False to skip them)")
    skipped += [(where, reason) for where in unknown]
    imaged = {(row["patient_id"], row["side"]) for row in rows}
    skipped += [(f"{clinical_path.name}: {patient} {side}", "clinical row without any usable image")
                for patient, side in by_breast if (patient, side) not in imaged]
    if skipped:
        warnings.warn(f"cmmd at {root}: {format_skipped(skipped, limit=5)}", UserWarning, stacklevel=2)
    table = finish_table(rows, dataset="cmmd", modality="mammo", label_column="subtype", source=root,
                         extra_columns=("subtype", "classification", "abnormality", "age", "image_id"),
                         skipped=skipped)
    table.attrs["labels"] = str(clinical_path)
    return table
