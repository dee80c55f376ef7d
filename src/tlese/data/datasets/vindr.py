"""VinDr-Mammo (PhysioNet release): `breast-level_annotations.csv` + `images/<study_id>/<image_id>.dicom`.

The release has no patient identifier; each of its 5,000 exams (study_id) is one woman, so `patient_id` is the
study_id. Labels (breast_birads, breast_density) are given per breast, repeated on each of its images. The
official `split` column (training/test) is kept so a user can reproduce the published split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlese.data.datasets import register_adapter
from tlese.data.datasets._common import finish_table, read_label_file
from tlese.vocab import side_code, view_code

ANNOTATIONS = "breast-level_annotations.csv"
REQUIRED_COLUMNS = ("study_id", "image_id", "laterality", "view_position", "breast_birads", "breast_density")
_SUFFIXES = (".dicom", ".dcm", ".png")


def _image_path(image_dir: Path, study_id: str, image_id: str) -> Path | None:
    for suffix in _SUFFIXES:
        candidate = image_dir / study_id / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


@register_adapter("vindr")
def load_vindr(
    root: str | Path, annotations: str = ANNOTATIONS, image_dir: str = "images", check_files: bool = True
) -> pd.DataFrame:
    """Load VinDr-Mammo from `root`.

    Columns: contract + study_id, series_id, image_id, breast_birads ('BI-RADS 1'..'BI-RADS 5'),
    breast_density ('DENSITY A'..'DENSITY D'), split. `label` = breast_birads.
    A missing image raises FileNotFoundError naming the CSV row (set `check_files=False` to keep the row).
    """
    root = Path(root)
    csv_path = root / annotations
    frame = read_label_file(csv_path, required=REQUIRED_COLUMNS)
    images = root / image_dir
    sides, views, paths = [], [], []
    for index, row in enumerate(frame.itertuples(index=False)):
        where = f"{csv_path} row {index + 1} (image {row.image_id})"
        side, view = side_code(row.laterality), view_code(row.view_position)
        if side is None:
            raise ValueError(f"{where}: laterality {row.laterality!r} is not L or R")
        if view is None:
            raise ValueError(f"{where}: view_position {row.view_position!r} is not a mammographic view")
        path = _image_path(images, row.study_id, row.image_id)
        if path is None:
            if check_files:
                raise FileNotFoundError(f"{where}: no {images / row.study_id / row.image_id}{{.dicom,.dcm,.png}}")
            path = images / row.study_id / f"{row.image_id}.dicom"
        sides.append(side)
        views.append(view)
        paths.append(str(path.resolve()))
    frame["patient_id"] = frame["study_id"]
    frame["side"], frame["view"], frame["path"] = sides, views, paths
    frame = frame.drop(columns=["laterality", "view_position"])
    return finish_table(
        frame,
        dataset="vindr",
        modality="mammo",
        label_column="breast_birads",
        source=root,
        extra_columns=("study_id", "series_id", "image_id", "breast_birads", "breast_density", "split"),
    )
