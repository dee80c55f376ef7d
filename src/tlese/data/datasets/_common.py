"""Helpers shared by the dataset adapters: the table contract, label-file reading and folder walking (sides and views
are parsed by `tlese.vocab`)."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from tlese.vocab import MODALITIES

# Every adapter returns at least these columns, in this order, followed by its extra label columns.
TABLE_COLUMNS: tuple[str, ...] = ("patient_id", "side", "view", "path", "label", "dataset", "modality")

# Chest X-rays carry no breast side, and the public CXR sets do not say PA or AP: both are the empty string
# (meaning "not applicable / unknown"), never NaN, so string comparisons and groupby behave.
NO_SIDE = ""
UNKNOWN_VIEW = ""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")


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
    skipped: Iterable[tuple[str, str]] = (),
) -> pd.DataFrame:
    """Put a table in the adapter contract: contract columns first, `label` copied from `label_column`.

    Every table gets an `image_id`: the adapter's own when it names each image once, else the image path relative
    to the dataset root (posix), so outputs can name an image without its absolute path. The table's `attrs`
    record where it came from (dataset, source folder or file), so anything computed from it (folds, caches) can
    say what data it used, and `attrs["skipped"]`: the (path relative to the root, reason) of every file or label
    row the adapter left out (see `format_skipped`).
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
    if "image_id" not in table.columns or _ambiguous_ids(table):
        base = Path(source) if Path(source).is_dir() else Path(source).parent
        table["image_id"] = [relative_id(path, base) for path in table["path"]]
    extras = [column for column in extra_columns if column in table.columns and column not in TABLE_COLUMNS]
    extras += [column for column in table.columns if column not in TABLE_COLUMNS and column not in extras]
    table = table[list(TABLE_COLUMNS) + extras].reset_index(drop=True)
    table.attrs["dataset"] = dataset
    table.attrs["source"] = str(source)
    table.attrs["skipped"] = [(str(where), str(reason)) for where, reason in skipped]
    return table


def relative_id(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root`, posix, both resolved (`../` steps when `path` lies outside `root`)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def _ambiguous_ids(table: pd.DataFrame) -> bool:
    """True when one image_id names two different files (e.g. CBIS `1-1` in every folder)."""
    ids = clean_text(table["image_id"])
    return bool((ids == "").any() or (table.groupby(ids)["path"].nunique() > 1).any())


def format_skipped(skipped: Iterable[tuple[str, str]], limit: int = 20) -> str:
    """One line per skipped entry (at most `limit`), then the count by reason: for reports and logs."""
    skipped = list(skipped)
    if not skipped:
        return "nothing skipped"
    lines = [f"{len(skipped)} skipped:"] + [f"  {where}: {reason}" for where, reason in skipped[:limit]]
    if len(skipped) > limit:
        reasons = Counter(reason.split(" (")[0].split(":")[0] for _, reason in skipped)
        lines.append(f"  ... and {len(skipped) - limit} more; by reason: {dict(reasons.most_common())}")
    return "\n".join(lines)


def walk_files(folder: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file below `folder`, sorted, following symlinked folders (Path.rglob does not); each real folder is
    entered once, so a symlink loop ends. Returns the files and the (relative path, reason) of folders not
    entered (a second link to a folder already seen, or unreadable)."""
    folder = Path(folder)
    files, skipped, seen = [], [], set()

    def unreadable(error: OSError) -> None:
        where = relative_id(error.filename, folder) if error.filename else "."
        skipped.append((where, f"cannot read folder ({error.strerror or error})"))

    for current, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        stat = os.stat(current)
        if (stat.st_dev, stat.st_ino) in seen:
            skipped.append((Path(os.path.relpath(current, folder)).as_posix(),
                            "folder already seen through another path (symlink loop or second link): not read twice"))
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames.sort()
        files.extend(Path(current) / name for name in filenames)
    return sorted(files), skipped


def warn_image_level_ids(dataset: str, root: Path, n_images: int) -> None:
    """Patient IDs taken from file stems make 'patient-level' splits only image-level: say so."""
    warnings.warn(
        f"{dataset} at {root}: the source gives no patient IDs, so each of the {n_images} images is its own "
        "'patient' (patient_id = file stem); folds are then image-level and may leak a patient across folds",
        UserWarning,
        stacklevel=3,
    )


def find_images(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES, skip_dirs: Iterable[str] = ()) -> list[Path]:
    """Image files below `folder` (recursive, symlinked folders followed, sorted), leaving out any folder named in
    `skip_dirs` (any case)."""
    suffixes = {suffix.lower() for suffix in suffixes}
    skipped = {name.lower() for name in skip_dirs}
    found = []
    for path in walk_files(folder)[0]:
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if skipped and any(part.lower() in skipped for part in path.relative_to(folder).parts[:-1]):
            continue
        found.append(path)
    return sorted(found)
