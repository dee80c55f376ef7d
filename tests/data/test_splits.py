"""Patient-level folds: disjointness, stratification, reproducibility, fold files, summaries, train/val/test."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from tlese.data.splits import (
    assert_patient_disjoint,
    assert_tables_disjoint,
    fold_summary,
    load_folds,
    make_folds,
    patient_labels,
    save_folds,
    split_train_val,
)


def encoded_table(n_patients: int = 60, n_classes: int = 3, seed: int = 0) -> pd.DataFrame:
    """Breast-level table: each patient one or two breasts x CC/MLO, one target per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(n_patients):
        target = number % n_classes
        for side in (["L", "R"] if rng.random() < 0.3 else [str(rng.choice(["L", "R"]))]):
            for view in ("CC", "MLO"):
                rows.append({"patient_id": f"P{number:03d}", "side": side, "view": view,
                             "path": f"/x/{number}{side}{view}", "target": target, "target_name": f"class{target}"})
    return pd.DataFrame(rows)


def test_folds_are_patient_level_and_cover_every_patient_once():
    table = encoded_table()
    folds = make_folds(table, k=5, seed=0)
    assert_patient_disjoint(folds)
    assert sorted(folds["patient_id"]) == sorted(table["patient_id"].unique())
    assert folds["fold"].value_counts().sort_index().tolist() == [12] * 5
    merged = table.merge(folds, on="patient_id")
    assert (merged.groupby("patient_id")["fold"].nunique() == 1).all()  # both views and breasts together


def test_folds_are_stratified_by_patient_label():
    folds = make_folds(encoded_table(), k=5, seed=3)
    labels = patient_labels(encoded_table())
    per_fold = folds.assign(label=folds["patient_id"].map(labels)).groupby("fold")["label"].value_counts().unstack()
    assert (per_fold == 4).all().all()  # 20 patients per class -> 4 per fold each


def test_same_seed_same_folds_and_different_seed_different_folds():
    table = encoded_table()
    pd.testing.assert_frame_equal(make_folds(table, seed=7), make_folds(table, seed=7))
    assert not make_folds(table, seed=7)["fold"].equals(make_folds(table, seed=8)["fold"])


def test_patient_label_is_the_most_frequent_then_the_highest():
    table = pd.DataFrame({"patient_id": ["A", "A", "A", "B", "B"], "target": [0, 0, 1, 0, 2]})
    assert patient_labels(table).to_dict() == {"A": 0, "B": 2}


def test_assert_patient_disjoint_catches_a_patient_in_two_folds():
    folds = pd.DataFrame({"patient_id": ["P1", "P2", "P1"], "fold": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"1 patient\(s\) in more than one fold, e.g. P1 in folds \[0, 2\]"):
        assert_patient_disjoint(folds)
    with pytest.raises(ValueError, match="in both train and test"):
        assert_tables_disjoint(train=pd.DataFrame({"patient_id": ["P1"]}), test=pd.DataFrame({"patient_id": ["P1"]}))


def test_fold_file_round_trip_keeps_folds_and_metadata(tmp_path):
    table = encoded_table()
    table["patient_id"] = "0" + table["patient_id"].str[1:]  # IDs with leading zeros must stay text
    folds = make_folds(table, k=4, seed=11)
    path = save_folds(folds, tmp_path / "folds_seed11.csv", source="fixture")
    assert path.read_text().splitlines()[0].startswith("# tlese-folds {")
    loaded = load_folds(path, table=table)
    pd.testing.assert_frame_equal(loaded, folds[["patient_id", "fold"]])
    assert loaded.attrs["seed"] == 11 and loaded.attrs["k"] == 4 and loaded.attrs["source"] == "fixture"
    assert loaded.attrs["data_hash"] == folds.attrs["data_hash"]


def test_load_folds_rejects_bad_files_and_warns_on_changed_data(tmp_path):
    table = encoded_table(n_patients=20)
    path = save_folds(make_folds(table, k=5, seed=0), tmp_path / "folds.csv")
    changed = table.assign(target=(table["target"] + 1) % 3)
    with pytest.warns(UserWarning, match="differ from the data these folds were made from"):
        load_folds(path, table=changed)
    extra = pd.concat([table, table.head(1).assign(patient_id="NEW")])
    with pytest.raises(ValueError, match=r"1 patient\(s\) of the table have no fold, e.g. NEW"):
        load_folds(path, table=extra)
    (tmp_path / "dup.csv").write_text("patient_id,fold\nP1,0\nP1,1\n")
    with pytest.raises(ValueError, match="dup.csv: patient P1 is listed more than once"):
        load_folds(tmp_path / "dup.csv")
    (tmp_path / "gap.csv").write_text('# tlese-folds {"k": 3}\npatient_id,fold\nP1,0\nP2,2\n')
    with pytest.raises(ValueError, match=r"gap.csv: fold\(s\) \[1\] have no patient"):
        load_folds(tmp_path / "gap.csv")


def test_fold_summary_counts_and_warns_when_a_fold_lacks_a_class():
    table = encoded_table(n_patients=20, n_classes=2)
    table.loc[table["patient_id"] == "P001", "target"] = 2  # a class with one patient cannot be in every fold
    table.loc[table["patient_id"] == "P001", "target_name"] = "rare"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the rare class too
        folds = make_folds(table, k=4, seed=0)
    with pytest.warns(UserWarning, match=r"fold \d has no example of class\(es\) rare"):
        summary = fold_summary(table, folds)
    per_fold = summary[summary["fold"] != "all"]
    assert per_fold["patients"].sum() == 20 and per_fold["images"].sum() == len(table)
    total = summary.set_index("fold").loc["all"]
    assert total["breasts"] == len(table[["patient_id", "side"]].drop_duplicates())
    n_rare = int((table["target"] == 2).sum())
    assert total["n_rare"] == n_rare and total["n_class0"] + total["n_class1"] + n_rare == len(table)
    assert (per_fold["missing_classes"] == "rare").sum() == 3


def test_split_train_val_is_patient_disjoint_and_uses_only_training_folds():
    table = encoded_table(n_patients=100)
    folds = make_folds(table, k=5, seed=0)
    train, val, test = split_train_val(table, folds, test_fold=2, val_fraction=0.2, seed=1)
    assert set(test["patient_id"]) == set(folds.loc[folds["fold"] == 2, "patient_id"])
    assert val["patient_id"].nunique() == 16  # 20% of the 80 non-test patients
    assert set(val["target"]) == {0, 1, 2}  # stratified
    assert len(train) + len(val) + len(test) == len(table)
    assert_tables_disjoint(train=train, val=val, test=test)
    again = split_train_val(table, folds, test_fold=2, val_fraction=0.2, seed=1)[1]
    pd.testing.assert_frame_equal(val, again)


def test_split_train_val_falls_back_when_a_class_is_too_small_to_stratify():
    table = encoded_table(n_patients=30, n_classes=2)
    table.loc[table["patient_id"] == "P000", "target"] = 2
    folds = make_folds(table, k=3, seed=0, stratify_column=None)
    train, val, test = split_train_val(table, folds, test_fold=0, val_fraction=0.3, seed=0)
    assert_tables_disjoint(train=train, val=val, test=test)
    assert val["patient_id"].nunique() == 6


def test_tiny_sets_fall_back_to_unstratified_folds_with_a_warning():
    table = encoded_table(n_patients=4, n_classes=2)  # 2 patients per class < 3 folds
    with pytest.warns(UserWarning, match="not stratified"):
        folds = make_folds(table, k=3, seed=0)
    assert sorted(folds["fold"].unique()) == [0, 1, 2]


def test_too_few_patients_for_k_is_an_error():
    with pytest.raises(ValueError, match="3 patient\\(s\\) cannot fill 5 folds"):
        make_folds(encoded_table(n_patients=3), k=5)


def test_real_darkcovidnet_folds_keep_each_patient_in_one_fold(cxr_dir):
    from tlese.data.datasets import load_dataset
    from tlese.data.tasks import get_task

    table, report = get_task("cxr_covid3").encode(load_dataset("darkcovidnet", cxr_dir))
    assert report.rows_out == 889
    folds = make_folds(table, k=5, seed=0)
    assert len(folds) == 602
    merged = table.merge(folds, on="patient_id")
    assert (merged.groupby("patient_id")["fold"].nunique() == 1).all()  # NIH patients with several images too
    summary = fold_summary(table, folds, classes=get_task("cxr_covid3").classes)
    assert (summary["missing_classes"] == "").all()
    assert summary.set_index("fold").loc["all", "n_covid"] == 89


def test_synth_and_folds_commands_write_a_reloadable_fold_file(tmp_path, capsys):
    from tlese.cli import main

    assert main(["synth", "--out", str(tmp_path / "demo"), "--patients", "20", "--size", "64",
                 "--cxr-per-class", "2", "--seed", "1"]) == 0
    out = tmp_path / "folds_seed4.csv"
    assert main(["folds", "--dataset", "cmmd", "--root", str(tmp_path / "demo" / "cmmd"), "--task", "synth_subtype4",
                 "--k", "3", "--seed", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "task synth_subtype4: kept" in printed and "n_triple negative" in printed
    folds = load_folds(out)
    assert folds.attrs["seed"] == 4 and folds.attrs["k"] == 3 and "task=synth_subtype4" in folds.attrs["source"]
    assert main(["folds", "--dataset", "cmmd", "--root", str(tmp_path), "--task", "nope", "--out", str(out)]) == 2


def test_fold_file_records_the_dataset_it_came_from(mias_dir, tmp_path):
    from tlese.data.datasets import load_dataset
    from tlese.data.tasks import get_task

    table, _ = get_task("mias_abnormal").encode(load_dataset("mias", mias_dir))
    folds = make_folds(table, k=5, seed=2)
    assert_patient_disjoint(folds)
    assert len(folds) == 128  # both breasts of each woman in one fold
    loaded = load_folds(save_folds(folds, tmp_path / "mias_folds.csv"), table=table)
    assert loaded.attrs["source"] == f"mias:{mias_dir}" and loaded.attrs["seed"] == 2
