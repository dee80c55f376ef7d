"""Patient-level folds: make, check, save, load, summarise, and carve train/val/test for one fold.

Folds are assigned to *patients*, never images or breasts, so the CC and MLO views and both breasts of a woman
always land in the same fold. Stratification is done on one label per patient: the class of most of her rows,
ties broken towards the higher target index (in the ordered tasks here — benign < malignant, normal < abnormal —
that is the more severe class). Patients are then split with sklearn's `StratifiedKFold(shuffle=True,
random_state=seed)`, which on one-row-per-patient data is the same as grouping rows by patient.

A fold file is a CSV `patient_id,fold` whose first line is a comment holding JSON metadata:
`# tlese-folds {"k": 5, "seed": 0, "data_hash": "...", "source": "..."}`; `data_hash` fingerprints the patients
and their stratification labels, so a fold file can be checked against the table it is used with.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from tlese.files import write_text_atomic

HEADER_PREFIX = "# tlese-folds "


def patient_labels(table: pd.DataFrame, stratify_column: str = "target") -> pd.Series:
    """One stratification label per patient (index patient_id): her most frequent label, ties -> the highest."""
    if stratify_column not in table.columns:
        raise ValueError(f"no column {stratify_column!r} to stratify on (columns: {list(table.columns)})")
    counts = table.groupby(["patient_id", stratify_column]).size().reset_index(name="n")
    counts = counts.sort_values(["patient_id", "n", stratify_column], ascending=[True, False, False])
    return counts.drop_duplicates("patient_id").set_index("patient_id")[stratify_column]


def table_fingerprint(table: pd.DataFrame, stratify_column: str | None = "target") -> str:
    """Short SHA-256 of the sorted patients (and their stratification labels): which data folds came from."""
    if stratify_column and stratify_column in table.columns:
        labels = patient_labels(table, stratify_column)
        lines = [f"{patient}\t{label}" for patient, label in labels.items()]
    else:
        lines = sorted(set(table["patient_id"].astype(str)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def make_folds(table: pd.DataFrame, k: int = 5, seed: int = 0, stratify_column: str | None = "target") -> pd.DataFrame:
    """Assign every patient of `table` to one of `k` folds (0..k-1), stratified by her label when possible.

    Returns DataFrame[patient_id, fold] sorted by patient_id, with `attrs` {k, seed, data_hash, stratify_column,
    source} (source = the table's adapter attrs "dataset:folder", when present).
    `stratify_column=None` gives plain shuffled folds. Fewer patients than folds is a ValueError; a class with
    fewer patients than folds cannot be in every fold (sklearn warns; `fold_summary` reports it).
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if stratify_column:
        labels = patient_labels(table, stratify_column)
        patients = labels.index.to_numpy()
    else:
        patients = np.array(sorted(set(table["patient_id"].astype(str))))
    if len(patients) < k:
        raise ValueError(f"{len(patients)} patient(s) cannot fill {k} folds")
    fold_of = np.empty(len(patients), dtype=int)
    stratify = bool(stratify_column)
    if stratify and labels.value_counts().max() < k:
        # StratifiedKFold refuses when every class has fewer patients than folds; tiny sets get plain folds.
        warnings.warn(f"every class has fewer than {k} patients: folds are not stratified", UserWarning, stacklevel=2)
        stratify = False
    if stratify:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(patients, labels.to_numpy())
    else:
        splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(patients)
    for fold, (_, test_index) in enumerate(splits):
        fold_of[test_index] = fold
    folds = pd.DataFrame({"patient_id": patients.astype(str), "fold": fold_of})
    folds = folds.sort_values("patient_id", ignore_index=True)
    # The adapter's attrs (dataset, source folder) travel into the fold file's header through save_folds.
    source = ":".join(str(table.attrs[key]) for key in ("dataset", "source") if table.attrs.get(key)) or None
    folds.attrs.update(k=k, seed=seed, data_hash=table_fingerprint(table, stratify_column),
                       stratify_column=stratify_column, source=source)
    return folds


def assert_patient_disjoint(folds: pd.DataFrame) -> None:
    """Raise ValueError if any patient is assigned to more than one fold."""
    per_patient = folds.groupby("patient_id")["fold"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        example = leaked.index[0]
        raise ValueError(f"{len(leaked)} patient(s) in more than one fold, e.g. {example} in folds "
                         f"{sorted(folds.loc[folds['patient_id'] == example, 'fold'].unique().tolist())}")


def assert_tables_disjoint(**tables: pd.DataFrame) -> None:
    """Raise ValueError if two of the named tables (e.g. train=..., val=..., test=...) share a patient."""
    names = list(tables)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = set(tables[first]["patient_id"]) & set(tables[second]["patient_id"])
            if shared:
                raise ValueError(f"{len(shared)} patient(s) in both {first} and {second}, e.g. {sorted(shared)[0]}")


def save_folds(folds: pd.DataFrame, path: str | Path, seed: int | None = None, source: str | None = None) -> Path:
    """Write the fold file (metadata comment line + CSV). `seed` defaults to the one recorded by make_folds."""
    assert_patient_disjoint(folds)
    path = Path(path)
    meta = {
        "k": int(folds.attrs.get("k", folds["fold"].nunique())),
        "seed": seed if seed is not None else folds.attrs.get("seed"),
        "data_hash": folds.attrs.get("data_hash"),
        "stratify_column": folds.attrs.get("stratify_column"),
        "source": source if source is not None else folds.attrs.get("source"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a cluster job reading the fold file never sees half of it.
    text = HEADER_PREFIX + json.dumps(meta, sort_keys=True) + "\n"
    write_text_atomic(path, text + folds[["patient_id", "fold"]].drop_duplicates().to_csv(index=False))
    return path


def load_folds(path: str | Path, table: pd.DataFrame | None = None, strict: bool = False) -> pd.DataFrame:
    """Read and validate a fold file; with `table`, also check that it covers every patient of the table.

    Metadata from the header line goes to `attrs`. A patient of the table without a fold is an error. A data_hash
    different from the table's (the labels or patients changed since the folds were made) and patients of the file
    that are not in the table give a warning, or with `strict` (what a run reusing its folds asks) an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fold file not found")
    with path.open() as handle:
        first = handle.readline()
    meta = {}
    if first.startswith(HEADER_PREFIX):
        try:
            meta = json.loads(first[len(HEADER_PREFIX):])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: unreadable metadata line ({error})") from None
    folds = pd.read_csv(path, skiprows=1 if meta else 0, dtype={"patient_id": str}, keep_default_na=False)
    if list(folds.columns[:2]) != ["patient_id", "fold"]:
        raise ValueError(f"{path}: expected columns patient_id,fold; found {list(folds.columns)}")
    folds = folds[["patient_id", "fold"]]
    if not pd.api.types.is_integer_dtype(folds["fold"]):
        raise ValueError(f"{path}: fold values must be integers")
    duplicated = folds[folds["patient_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: patient {duplicated['patient_id'].iloc[0]} is listed more than once")
    k = int(meta.get("k", folds["fold"].max() + 1))
    out_of_range = folds[(folds["fold"] < 0) | (folds["fold"] >= k)]
    if len(out_of_range):
        raise ValueError(f"{path}: fold {out_of_range['fold'].iloc[0]} outside 0..{k - 1}")
    empty = sorted(set(range(k)) - set(folds["fold"]))
    if empty:
        raise ValueError(f"{path}: fold(s) {empty} have no patient")
    folds.attrs.update(meta, k=k, path=str(path))
    if table is not None:
        _check_covers(folds, table, str(path))
        stratify = meta.get("stratify_column")
        expected = meta.get("data_hash")
        comparable = stratify is None or stratify in table.columns
        problems = []
        extra = sorted(set(folds["patient_id"]) - set(table["patient_id"].astype(str)))
        if extra:
            problems.append(f"{len(extra)} patient(s) of the fold file are not in the data, e.g. {extra[:3]}")
        if expected and comparable and table_fingerprint(table, stratify) != expected:
            problems.append("the data (patients or their labels) differ from the data these folds were made from "
                            f"(data hash {table_fingerprint(table, stratify)} != {expected})")
        for problem in problems:
            if strict:
                raise ValueError(f"{path}: {problem}; make new folds (another run name, or delete the file)")
            warnings.warn(f"{path}: {problem}", UserWarning, stacklevel=2)
    return folds


def _check_covers(folds: pd.DataFrame, table: pd.DataFrame, where: str = "folds") -> None:
    missing = sorted(set(table["patient_id"].astype(str)) - set(folds["patient_id"]))
    if missing:
        raise ValueError(f"{where}: {len(missing)} patient(s) of the table have no fold, e.g. {missing[0]}")


def _class_names(table: pd.DataFrame) -> dict[int, str]:
    if "target_name" in table.columns:
        return dict(sorted(table[["target", "target_name"]].drop_duplicates().itertuples(index=False, name=None)))
    return {int(target): str(target) for target in sorted(table["target"].unique())}


def fold_summary(table: pd.DataFrame, folds: pd.DataFrame, classes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Per fold (and "all"): patients, breasts (0 for chest X-rays), images, images per class, classes missing.

    `classes` (task order) lets a class absent from the whole table be reported too. A fold lacking a class
    triggers a warning: its per-class metrics (e.g. one-vs-rest AUC) are undefined.
    """
    _check_covers(folds, table)
    merged = table.merge(folds[["patient_id", "fold"]], on="patient_id", how="left")
    names = _class_names(merged)
    if classes is not None:
        names = {index: name for index, name in enumerate(classes)}
    rows = []
    for fold, part in [*merged.groupby("fold"), ("all", merged)]:
        with_side = part[part["side"].astype(str) != ""] if "side" in part.columns else part.iloc[0:0]
        row = {
            "fold": fold,
            "patients": part["patient_id"].nunique(),
            "breasts": len(with_side[["patient_id", "side"]].drop_duplicates()),
            "images": len(part),
        }
        counts = part["target"].value_counts()
        for index, name in names.items():
            row[f"n_{name}"] = int(counts.get(index, 0))
        row["missing_classes"] = ",".join(name for index, name in names.items() if counts.get(index, 0) == 0)
        rows.append(row)
    summary = pd.DataFrame(rows)
    lacking = summary[(summary["fold"] != "all") & (summary["missing_classes"] != "")]
    for row in lacking.itertuples(index=False):
        warnings.warn(f"fold {row.fold} has no example of class(es) {row.missing_classes}", UserWarning, stacklevel=2)
    return summary


def split_train_val(
    table: pd.DataFrame, folds: pd.DataFrame, test_fold: int, val_fraction: float = 0.15, seed: int = 0,
    stratify_column: str = "target",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, val, test) tables for one outer fold: test = that fold; val = a patient sample of the other folds.

    Validation patients are drawn stratified by patient label; if a class has too few patients for that, the
    draw falls back to unstratified (still patient-level). The three tables never share a patient.
    """
    _check_covers(folds, table)
    if test_fold not in set(folds["fold"]):
        raise ValueError(f"test_fold {test_fold} not in folds {sorted(folds['fold'].unique())}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    test_patients = set(folds.loc[folds["fold"] == test_fold, "patient_id"])
    in_test = table["patient_id"].astype(str).isin(test_patients)
    test, rest = table[in_test], table[~in_test]
    val_patients: set[str] = set()
    if val_fraction > 0 and len(rest):
        if stratify_column in rest.columns:
            labels = patient_labels(rest, stratify_column)
        else:
            labels = pd.Series(0, index=sorted(set(rest["patient_id"])))
        n_val = max(1, int(round(val_fraction * len(labels))))
        if n_val >= len(labels):
            raise ValueError(f"val_fraction {val_fraction} leaves no training patient ({len(labels)} available)")
        try:
            _, val_ids = train_test_split(labels.index.to_numpy(), test_size=n_val, random_state=seed,
                                          stratify=labels.to_numpy())
        except ValueError:  # a class with a single patient, or fewer val patients than classes
            _, val_ids = train_test_split(labels.index.to_numpy(), test_size=n_val, random_state=seed)
        val_patients = set(map(str, val_ids))
    in_val = rest["patient_id"].astype(str).isin(val_patients)
    train, val = rest[~in_val], rest[in_val]
    assert_tables_disjoint(train=train, val=val, test=test)
    return train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True)
