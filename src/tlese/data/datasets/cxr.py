"""Chest X-ray sets used for the intermediate transfer stage.

Convention for every CXR table: `side == ""` (no laterality) and `view == ""` (frontal, PA/AP not given by these
sources), `modality == "cxr"`, `label` = the class name as the source spells it (tasks map the spellings).
`patient_id` is the real patient where the source has one (DarkCovidNet labels.csv, COVIDx); otherwise the file
stem, and the adapter warns that splits are then image-level only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import (
    NO_SIDE,
    UNKNOWN_VIEW,
    find_images,
    finish_table,
    read_label_file,
    warn_image_level_ids,
)

CXR_SUFFIXES = (".png", ".jpg", ".jpeg")
# Sub-folders that hold segmentation masks, not radiographs (COVID-19 Radiography Database >= v4).
MASK_DIRS = ("masks", "mask", "lung masks")

COVID_RADIOGRAPHY_CLASSES = ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia")
DARKCOVIDNET_FOLDERS = {"Covid-19": "covid", "No_findings": "no_findings", "Pneumonia": "pneumonia"}
# NIH ChestX-ray8 file names start with the 8-digit patient number: 00001280_004.png -> NIH_00001280.
_NIH_STEM = re.compile(r"^(\d{8})_\d{3}$")


def _cxr_table(rows: list[dict], dataset: str, source: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table["side"], table["view"] = NO_SIDE, UNKNOWN_VIEW
    return finish_table(table, dataset=dataset, modality="cxr", label_column="label", source=source,
                        extra_columns=("image_id",))


def _class_folder_rows(root: Path, class_dirs: dict[str, Path]) -> list[dict]:
    rows = []
    for label, folder in class_dirs.items():
        for path in find_images(folder, CXR_SUFFIXES, skip_dirs=MASK_DIRS):
            rows.append({"patient_id": path.stem, "path": str(path.resolve()), "label": label, "image_id": path.stem})
    if not rows:
        raise FileNotFoundError(f"{root}: no {'/'.join(CXR_SUFFIXES)} images found in the class folders "
                                f"{sorted(class_dirs)}")
    return rows


def _unique_image_ids(root: Path, rows: list[dict]) -> None:
    """Stems double as patient IDs; when a stem repeats (e.g. `1.png` in every class folder), use the path
    below `root` without suffix instead, so two different images never become one "patient"."""
    stems = [row["image_id"] for row in rows]
    if len(set(stems)) == len(stems):
        return
    for row in rows:
        row["image_id"] = row["patient_id"] = Path(row["path"]).relative_to(root.resolve()).with_suffix("").as_posix()


@register_adapter("cxr_folders")
def load_cxr_folders(root: str | Path) -> pd.DataFrame:
    """Generic class-folder layout `root/<class>/**/*.png|jpg` (mask folders skipped); label = folder name."""
    root = Path(root)
    folders = sorted(folder for folder in root.iterdir() if folder.is_dir()) if root.is_dir() else []
    class_dirs = {folder.name: folder for folder in folders if folder.name.lower() not in MASK_DIRS}
    if not class_dirs:
        raise FileNotFoundError(f"{root}: expected one sub-folder per class (root/<class>/*.png)")
    rows = _class_folder_rows(root, class_dirs)
    _unique_image_ids(root, rows)
    warn_image_level_ids("cxr_folders", root, len(rows))
    return _cxr_table(rows, "cxr_folders", root)


@register_adapter("covid_radiography")
def load_covid_radiography(root: str | Path) -> pd.DataFrame:
    """COVID-19 Radiography Database (Kaggle): `COVID/`, `Normal/`, `Lung_Opacity/`, `Viral Pneumonia/`,
    each with the images directly inside (early versions) or in `images/` beside `masks/` (later versions).

    The folder may sit one level down (`COVID-19_Radiography_Dataset/`); classes absent on disk are skipped.
    The database gives no patient IDs: patient_id = file stem (e.g. 'COVID-1'), with a warning.
    """
    root = Path(root)
    base = root
    if not any((root / name).is_dir() for name in COVID_RADIOGRAPHY_CLASSES):
        folders = [folder for folder in root.iterdir() if folder.is_dir()] if root.is_dir() else []
        nested = [folder for folder in folders if any((folder / name).is_dir() for name in COVID_RADIOGRAPHY_CLASSES)]
        if len(nested) != 1:
            raise FileNotFoundError(f"{root}: none of the class folders {list(COVID_RADIOGRAPHY_CLASSES)} found")
        base = nested[0]
    class_dirs = {name: base / name for name in COVID_RADIOGRAPHY_CLASSES if (base / name).is_dir()}
    rows = _class_folder_rows(root, class_dirs)
    _unique_image_ids(root, rows)
    warn_image_level_ids("covid_radiography", root, len(rows))
    return _cxr_table(rows, "covid_radiography", root)


def _read_covidx_list(list_path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < 3:
            raise ValueError(f"{list_path} line {number}: expected 'patient_id filename label [source]', got {line!r}")
        rows.append({"patient_id": fields[0], "filename": fields[1], "label": fields[2],
                     "source": " ".join(fields[3:])})
    return rows


@register_adapter("covidx")
def load_covidx(
    root: str | Path, splits: tuple[str, ...] = ("train", "val", "test"), check_files: bool = True
) -> pd.DataFrame:
    """COVIDx (COVID-Net): `<split>.txt` lines 'patient_id filename label source', images in `<split>/`.

    Labels are kept as written ('positive'/'negative' in V8+, 'COVID-19'/'normal'/'pneumonia' in V5-V7A).
    Older releases name the lists `train_COVIDx*.txt`; pass the exact file stems via `splits` if needed.
    A `split` column says which list each image came from.
    """
    root = Path(root)
    rows = []
    for split in splits:
        list_path = root / f"{split}.txt"
        if not list_path.is_file():
            continue
        image_dir = root / split.split("_")[0]  # train_COVIDx5.txt -> train/
        for row in _read_covidx_list(list_path):
            path = image_dir / row["filename"]
            if check_files and not path.is_file():
                raise FileNotFoundError(f"{list_path}: image {row['filename']} not found in {image_dir}")
            rows.append({"patient_id": row["patient_id"], "path": str(path.resolve()), "label": row["label"],
                         "image_id": Path(row["filename"]).stem, "source": row["source"], "split": split})
    if not rows:
        raise FileNotFoundError(f"{root}: none of {[f'{split}.txt' for split in splits]} found (COVIDx layout)")
    return _cxr_table(rows, "covidx", root)


@register_adapter("darkcovidnet")
def load_darkcovidnet(root: str | Path, check_files: bool = True) -> pd.DataFrame:
    """DarkCovidNet X-rays: the shared `labels.csv` layout (image_id, file, label, patient_id, ...), or the original
    class folders `Covid-19/`, `No_findings/`, `Pneumonia/` (labels mapped to covid/no_findings/pneumonia; NIH
    patient from the file name, other images fall back to the file stem with a warning).
    """
    root = Path(root)
    if (root / "labels.csv").is_file():
        frame = read_label_file(root / "labels.csv", required=("image_id", "file", "label", "patient_id"))
        frame["path"] = [str((root / file).resolve()) for file in frame["file"]]
        if check_files:
            missing = [path for path in frame["path"] if not Path(path).is_file()]
            if missing:
                raise FileNotFoundError(f"{root / 'labels.csv'}: {len(missing)} listed image(s) missing, "
                                        f"e.g. {missing[0]}")
        frame["side"], frame["view"] = NO_SIDE, UNKNOWN_VIEW
        return finish_table(frame, dataset="darkcovidnet", modality="cxr", label_column="label", source=root,
                            extra_columns=("image_id",))
    base = root / "X-Ray Image DataSet" if (root / "X-Ray Image DataSet").is_dir() else root
    class_dirs = {label: base / folder for folder, label in DARKCOVIDNET_FOLDERS.items() if (base / folder).is_dir()}
    if not class_dirs:
        raise FileNotFoundError(f"{root}: neither labels.csv nor the folders {list(DARKCOVIDNET_FOLDERS)} found")
    rows = _class_folder_rows(root, class_dirs)
    n_from_stem = 0
    for row in rows:
        nih = _NIH_STEM.match(row["image_id"])
        if nih:
            row["patient_id"] = f"NIH_{nih.group(1)}"
        else:
            n_from_stem += 1
    if n_from_stem:
        warn_image_level_ids("darkcovidnet (covid images without labels.csv)", root, n_from_stem)
    return _cxr_table(rows, "darkcovidnet", root)
