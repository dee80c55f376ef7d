"""CBIS-DDSM (TCIA): the four case-description CSVs + the DICOM tree; or a bare folder of its DICOMs.

CSV mode: `mass_case_description_{train,test}_set.csv` and `calc_case_description_{train,test}_set.csv`
(columns 'patient_id', 'left or right breast', 'image view', 'pathology', 'image file path', ...; one row per
abnormality). The 'image file path' (`Mass-Training_P_00001_LEFT_CC/<study uid>/<series uid>/000000.dcm`) often does
not match the tree the NBIA retriever writes (`Mass-Training_P_00001_LEFT_CC/<date>-NA-<n>/<series>/1-1.dcm`), so
when it is missing the single DICOM under the `Mass-Training_P_00001_LEFT_CC` folder is used instead.
Labels are per breast: the worst pathology over all abnormalities of the breast (both CSV families, both views)
is given to each of its images; `image_pathology` keeps the worst per image.

DICOM mode (no CSV): every full-mammogram DICOM below `root` (symlinked folders followed); side and view from the
header (falling back to the CBIS name `..._P_00173_LEFT_CC`), patient from that name or else the parent folder. No
labels. One bad file never stops the load: a file that is not a readable DICOM, whose header contradicts its case
name or that says neither side nor view is left out, as are the ROI mask and cropped-image series; each is listed
with its reason in `table.attrs["skipped"]` (path relative to the root), and a warning gives the count of the bad
ones.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import finish_table, format_skipped, read_label_file, walk_files
from tlese.data.io import DICOM_SUFFIXES, ImageReadError, check_header_against, read_header, read_header_and_tags
from tlese.vocab import side_code, view_code

CSV_PATTERN = "*case_description*.csv"
CSV_COLUMNS = ("patient_id", "left or right breast", "image view", "pathology", "image file path")
# Worst first: a breast with any malignant finding is malignant.
PATHOLOGY_SEVERITY = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
ROI_REASON = "ROI mask or cropped image, not a full mammogram: not used"
_CBIS_NAME = re.compile(r"(?P<patient>P_\d{5})_(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)(?P<roi>_\d+)?", re.IGNORECASE)


def cbis_case(text: str | None) -> dict | None:
    """The CBIS-DDSM case a PatientID or folder name such as `Mass-Test_P_00173_LEFT_CC` names: patient, side,
    view, and whether it is an ROI mask / crop series; None when the text does not follow the pattern."""
    match = _CBIS_NAME.search(text or "")
    if match is None:
        return None
    return {"patient": match.group("patient").upper(), "side": side_code(match.group("side")),
            "view": view_code(match.group("view")), "roi": bool(match.group("roi"))}


def worst_pathology(values) -> str:
    """MALIGNANT > BENIGN > BENIGN_WITHOUT_CALLBACK; unknown strings rank last, '' only if nothing else."""
    present = {str(value).strip().upper() for value in values} - {""}
    for pathology in PATHOLOGY_SEVERITY:
        if pathology in present:
            return pathology
    return sorted(present)[0] if present else ""


def _resolve_image(root: Path, csv_path: Path, index: int, listed: str) -> Path:
    listed = listed.strip().replace("\\", "/")
    for base in (root, root / "CBIS-DDSM"):
        if (base / listed).is_file():
            return base / listed
    case_folder = listed.split("/")[0]
    for base in (root, root / "CBIS-DDSM"):
        if (base / case_folder).is_dir():
            candidates = [path for path in walk_files(base / case_folder)[0]
                          if path.suffix.lower() == ".dcm" and path.is_file()]
            if len(candidates) == 1:
                return candidates[0]
            if len(candidates) > 1:
                raise ValueError(f"{csv_path} row {index + 1}: {len(candidates)} DICOMs under {base / case_folder}, "
                                 f"cannot tell which is {listed}")
    raise FileNotFoundError(f"{csv_path} row {index + 1}: image not found: {listed} (nor a DICOM under {case_folder}/)")


def _load_from_csvs(root: Path, csv_paths: list[Path], validate_headers: bool) -> pd.DataFrame:
    rows = []
    for csv_path in csv_paths:
        frame = read_label_file(csv_path, required=CSV_COLUMNS)
        family = "calc" if csv_path.name.lower().startswith("calc") else "mass"
        split = "test" if "test" in csv_path.name.lower() else "train"
        for index, row in frame.iterrows():
            side = side_code(row["left or right breast"])
            view = view_code(row["image view"])
            if side is None or view is None:
                raise ValueError(f"{csv_path} row {index + 1}: side {row['left or right breast']!r} / "
                                 f"view {row['image view']!r} not understood")
            path = _resolve_image(root, csv_path, index, row["image file path"])
            if validate_headers:
                check_header_against(read_header(path), view, side, path)
            rows.append({"patient_id": row["patient_id"], "side": side, "view": view, "path": str(path.resolve()),
                         "pathology": row["pathology"].upper(), "abnormality_type": family, "split": split,
                         "image_id": row["image file path"].strip().split("/")[0]})
    abnormalities = pd.DataFrame(rows)
    per_image = (
        abnormalities.groupby("path", sort=False)
        .agg(patient_id=("patient_id", "first"), side=("side", "first"), view=("view", "first"),
             image_pathology=("pathology", worst_pathology), n_abnormalities=("pathology", "size"),
             abnormality_type=("abnormality_type", lambda kinds: "+".join(sorted(set(kinds)))),
             split=("split", "first"), image_id=("image_id", "first"))
        .reset_index()
    )
    per_breast = per_image.groupby(["patient_id", "side"])["image_pathology"]
    breast_pathology = per_breast.agg(worst_pathology).rename("pathology")
    table = per_image.join(breast_pathology, on=["patient_id", "side"])
    return table.sort_values(["patient_id", "side", "view"]).reset_index(drop=True)


def _is_full_mammogram(tags: dict[str, str | None], path: Path) -> bool:
    # CBIS stores ROI masks and crops as separate series ("ROI mask images", "cropped images") in `..._CC_1` folders.
    description = (tags.get("SeriesDescription") or "").lower()
    if description:
        return "full mammogram" in description
    match = _CBIS_NAME.search(tags.get("PatientID") or "") or _CBIS_NAME.search(path.parent.name)
    return not (match and match.group("roi"))


class _Skip(Exception):
    """One file left out of the table, with its reason."""


def _dicom_row(path: Path, relative: str) -> dict:
    """The table row of one full-mammogram DICOM; _Skip (or ImageReadError) says why a file gives none."""
    header, tags = read_header_and_tags(path, ("PatientID", "SeriesDescription"))
    if not _is_full_mammogram(tags, path):
        raise _Skip(ROI_REASON)
    # CBIS PatientIDs are the dataset's own pseudonymous case names (e.g. Mass-Test_P_00173_LEFT_CC).
    name = _CBIS_NAME.search(tags.get("PatientID") or "") or _CBIS_NAME.search(relative)
    name_side = side_code(name.group("side")) if name else None
    name_view = view_code(name.group("view")) if name else None
    check_header_against(header, name_view, name_side, path)
    side, view = header.side or name_side, header.view or name_view
    if side is None or view is None:
        raise _Skip("side or view missing from both the header and the CBIS case name")
    return {"patient_id": name.group("patient").upper() if name else path.parent.name, "side": side, "view": view,
            "path": str(path.resolve()), "pathology": "", "image_id": path.stem}


def _load_from_dicoms(root: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The full-mammogram rows below `root` and the (relative path, reason) of every file left out."""
    files, skipped = walk_files(root)
    candidates = [path for path in files if path.suffix.lower() in DICOM_SUFFIXES and path.is_file()]
    if not candidates:
        raise FileNotFoundError(f"{root}: no case-description CSV and no .dcm files (CBIS-DDSM layout)")
    rows = []
    for path in candidates:
        relative = path.relative_to(root).as_posix()
        try:
            rows.append(_dicom_row(path, relative))
        except ImageReadError as error:
            skipped.append((relative, error.reason))
        except _Skip as reason:
            skipped.append((relative, str(reason)))
        except Exception as error:  # one unreadable file must not stop the load; report it
            skipped.append((relative, f"cannot read ({type(error).__name__})"))
    bad = [entry for entry in skipped if entry[1] != ROI_REASON]
    if not rows and bad:
        raise FileNotFoundError(f"{root}: no usable full mammogram DICOM; {format_skipped(bad, limit=5)}")
    if not rows:
        raise FileNotFoundError(f"{root}: only ROI/cropped DICOMs found, no full mammograms")
    if bad:
        warnings.warn(f"cbis_ddsm at {root}: {format_skipped(bad, limit=5)}", UserWarning, stacklevel=3)
    table = pd.DataFrame(rows).sort_values(["patient_id", "side", "view"]).reset_index(drop=True)
    return table, skipped


@register_adapter("cbis_ddsm")
def load_cbis_ddsm(root: str | Path, mode: str = "auto", csv_files: list[str | Path] | None = None,
                   validate_headers: bool = False) -> pd.DataFrame:
    """Load CBIS-DDSM from `root`.

    mode: "csv" (description CSVs in `root`, or `csv_files`), "dicom" (bare DICOM folder, no labels) or "auto"
    (csv when a `*case_description*.csv` is present). `validate_headers` reads every header to check side/view
    against the CSV (slow on the full set). Columns: contract + pathology (breast level), image_pathology,
    abnormality_type, n_abnormalities, split, image_id. `label` = pathology. DICOM mode lists every file it left
    out in `attrs["skipped"]` (see the module docstring).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CBIS-DDSM folder not found")
    csv_paths = [Path(path) for path in csv_files] if csv_files else sorted(root.glob(CSV_PATTERN))
    if mode not in ("auto", "csv", "dicom"):
        raise ValueError(f"mode must be 'auto', 'csv' or 'dicom', got {mode!r}")
    use_csv = mode == "csv" or (mode == "auto" and csv_paths)
    if use_csv and not csv_paths:
        raise FileNotFoundError(f"{root}: no {CSV_PATTERN} found (mode='csv')")
    if use_csv:
        table, skipped = _load_from_csvs(root, csv_paths, validate_headers), []
    else:
        table, skipped = _load_from_dicoms(root)
    return finish_table(table, dataset="cbis_ddsm", modality="mammo", label_column="pathology", source=root,
                        extra_columns=("pathology", "image_pathology", "abnormality_type", "n_abnormalities", "split",
                                       "image_id"), skipped=skipped)
