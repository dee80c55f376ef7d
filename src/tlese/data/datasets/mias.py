"""mini-MIAS: the shared `labels.csv` layout, or the original `Info.txt` with `mdbNNN.pgm`/`.png` files.

Rules taken from `Info.txt` NOTE 1: films come in pairs of one woman (mdb001+mdb002 = patient P001, ...),
left = even and right = odd file numbers. All MIAS films are MLO views. One row per image: with several
abnormality rows for one image, distinct classes are joined with '+' and a malignant finding wins the severity.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import clean_text, finish_table, read_label_file
from tlese.vocab import Side, View

LABEL_COLUMNS = ("tissue", "abnormality", "severity", "abnormal")
_INFO_ROW = re.compile(r"^(mdb\d{3})\s+([FGD])\s+([A-Z]{4})(?:\s+([BM]))?", re.IGNORECASE)
_IMAGE_SUFFIXES = (".png", ".pgm")


def mias_patient_and_side(image_id: str) -> tuple[str, str]:
    """'mdb005' -> ('P003', 'R'): pairs of films per woman, even numbers left, odd right."""
    number = int(re.sub(r"\D", "", image_id))
    return f"P{(number + 1) // 2:03d}", (Side.L.value if number % 2 == 0 else Side.R.value)


def parse_info_txt(path: Path) -> pd.DataFrame:
    """One row per image from `Info.txt`: image_id, tissue, abnormality, severity, n_abnormalities."""
    findings: dict[str, dict] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        match = _INFO_ROW.match(line.strip())
        if not match:
            continue
        image_id, tissue, kind = match.group(1).lower(), match.group(2).upper(), match.group(3).upper()
        severity = match.group(4)
        entry = findings.setdefault(image_id, {"image_id": image_id, "tissue": tissue, "classes": [], "severities": []})
        if kind != "NORM":
            entry["classes"].append(kind)
            entry["severities"].append((severity or "").upper())
    if not findings:
        raise ValueError(f"{path}: no 'mdbNNN <tissue> <class> ...' rows found")
    rows = []
    for entry in findings.values():
        classes = list(dict.fromkeys(entry["classes"]))  # distinct, in file order
        severities = set(entry["severities"]) - {""}
        rows.append(
            {
                "image_id": entry["image_id"],
                "tissue": entry["tissue"],
                "abnormality": "+".join(classes) if classes else "NORM",
                "severity": "M" if "M" in severities else ("B" if "B" in severities else ""),
                "n_abnormalities": len(entry["classes"]),
            }
        )
    return pd.DataFrame(rows)


def _from_labels_csv(root: Path) -> pd.DataFrame:
    required = ("image_id", "file", "patient_id", "side", "tissue", "abnormality", "severity")
    labels = read_label_file(root / "labels.csv", required=required)
    labels["path"] = [str((root / file).resolve()) for file in labels["file"]]
    return labels


def _from_info_txt(root: Path) -> pd.DataFrame:
    info = parse_info_txt(root / "Info.txt")
    images = {path.stem.lower(): path for path in sorted(root.rglob("mdb*")) if path.suffix.lower() in _IMAGE_SUFFIXES}
    # Info.txt lists all 322 films; a folder may hold a subset. Prefer PNG when both encodings exist.
    for path in list(images.values()):
        png = path.with_suffix(".png")
        if png.is_file():
            images[path.stem.lower()] = png
    info = info[info["image_id"].isin(images)].copy()
    if info.empty:
        raise FileNotFoundError(f"{root}: no mdbNNN.png/.pgm image listed in Info.txt was found")
    info["path"] = [str(images[image_id].resolve()) for image_id in info["image_id"]]
    info["patient_id"], info["side"] = zip(*(mias_patient_and_side(image_id) for image_id in info["image_id"]))
    return info


@register_adapter("mias")
def load_mias(root: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Load mini-MIAS from `root` (`labels.csv` if present, otherwise `Info.txt` + image files).

    Columns: contract + image_id, tissue (F/G/D), abnormality (NORM/CALC/CIRC/...), severity (B/M/''),
    abnormal ('normal'/'abnormal'). `label` = abnormality. View is always MLO.
    """
    root = Path(root)
    if (root / "labels.csv").is_file():
        table = _from_labels_csv(root)
    elif (root / "Info.txt").is_file():
        table = _from_info_txt(root)
    else:
        raise FileNotFoundError(f"{root}: neither labels.csv nor Info.txt found (mini-MIAS layout)")
    if check_files:
        missing = [path for path in table["path"] if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} image file(s) listed but missing, e.g. {missing[0]}")
    table["view"] = View.MLO.value
    table["abnormality"] = clean_text(table["abnormality"]).str.upper()
    table["abnormal"] = ["normal" if value == "NORM" else "abnormal" for value in table["abnormality"]]
    return finish_table(
        table,
        dataset="mias",
        modality="mammo",
        label_column="abnormality",
        source=root,
        extra_columns=("image_id",) + LABEL_COLUMNS,
    )
