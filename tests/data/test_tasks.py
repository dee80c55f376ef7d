"""Tasks: label mapping, policies for unknown labels and single-view breasts, registry and dict configs."""

from __future__ import annotations

import pandas as pd
import pytest

from tlese.data.tasks import Task, get_task, list_tasks, register_task


def breast_table(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """Rows (patient, side, view, subtype) in the adapter contract."""
    return pd.DataFrame(
        [{"patient_id": p, "side": s, "view": v, "path": f"/data/{p}_{s}_{v}.dcm", "label": label, "subtype": label,
          "dataset": "fixture", "modality": "mammo"} for p, s, v, label in rows]
    )


def test_registry_has_the_mission_tasks_and_rejects_unknown_names():
    assert {"cmmd_subtype4", "cmmd_luminal", "cmmd_malignancy", "mias_density", "mias_abnormal", "mias_severity",
            "cxr_covid3", "cxr_covid2", "synth_subtype4", "synth_cxr3"} <= set(list_tasks())
    assert get_task("cmmd_subtype4").classes == ("Luminal A", "Luminal B", "HER2-enriched", "triple negative")
    with pytest.raises(ValueError, match="unknown task 'nope'.*cmmd_subtype4"):
        get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task(Task("cmmd_subtype4", "subtype", ("a", "b")))


def test_encode_maps_classes_in_task_order_and_drops_empty_labels_with_a_report():
    table = breast_table([("P1", "L", "CC", "triple negative"), ("P1", "L", "MLO", "triple negative"),
                          ("P2", "R", "CC", "Luminal A"), ("P2", "R", "MLO", "Luminal A"),
                          ("P3", "L", "CC", ""), ("P3", "L", "MLO", "")])  # benign: no subtype
    encoded, report = get_task("cmmd_subtype4").encode(table)
    assert encoded.set_index(["patient_id", "view"])["target"].to_dict() == {
        ("P1", "CC"): 3, ("P1", "MLO"): 3, ("P2", "CC"): 0, ("P2", "MLO"): 0}
    assert set(encoded["target_name"]) == {"triple negative", "Luminal A"}
    assert report.rows_in == 6 and report.rows_out == 4
    assert report.dropped == {"empty label": 2}
    assert report.class_counts == {"Luminal A": 2, "Luminal B": 0, "HER2-enriched": 0, "triple negative": 2}
    assert "dropped 2 (empty label)" in report.summary() == str(report)


def test_grouping_merges_raw_labels():
    table = breast_table([("P1", "L", "CC", "Luminal B"), ("P2", "L", "CC", "HER2-enriched"),
                          ("P3", "L", "CC", "triple negative")])
    encoded, _ = get_task("cmmd_luminal").encode(table)
    assert encoded["target_name"].tolist() == ["luminal", "non_luminal", "non_luminal"]


def test_unknown_label_raises_naming_label_count_and_file_under_error_policy():
    table = breast_table([("P1", "L", "CC", "Luminal A"), ("P2", "L", "CC", "Basal-like"),
                          ("P3", "R", "CC", "Basal-like")])
    expected = r"label 'Basal-like' in column 'subtype' \(2 row\(s\), e\.g\. /data/P2_L_CC\.dcm\)"
    with pytest.raises(ValueError, match=expected):
        get_task("cmmd_subtype4").encode(table)


def test_unknown_label_is_dropped_and_counted_under_skip_policy():
    config = get_task("cmmd_subtype4").to_dict()
    task = Task.from_dict({**config, "name": "subtype_skip", "unknown_label_policy": "skip"})
    table = breast_table([("P1", "L", "CC", "Luminal A"), ("P1", "L", "MLO", "Luminal A"),
                          ("P2", "L", "CC", "Basal-like"), ("P2", "L", "MLO", "Basal-like")])
    encoded, report = task.encode(table)
    assert encoded["patient_id"].unique().tolist() == ["P1"]
    assert report.unknown_labels == {"Basal-like": 2}
    assert report.dropped == {"unknown label": 2}
    assert "'Basal-like' x2" in report.summary()


def one_view_table() -> pd.DataFrame:
    return breast_table([("P1", "L", "CC", "Luminal A"), ("P1", "L", "MLO", "Luminal A"),
                         ("P2", "R", "MLO", "Luminal B"),  # this breast has no CC
                         ("P3", "L", "CC", "Luminal B"), ("P3", "L", "XCCL", "Luminal B")])  # XCCL is not used


def test_single_view_breast_is_dropped_and_reported_under_drop_policy():
    config = get_task("cmmd_subtype4").to_dict()
    task = Task.from_dict({**config, "name": "drop_one_view", "single_view_policy": "drop"})
    encoded, report = task.encode(one_view_table())
    assert sorted(encoded["patient_id"].unique()) == ["P1"]
    assert report.single_view_breasts == 2
    assert report.dropped == {"view not in CC/MLO": 1, "breast lacks a view (policy drop)": 2}
    assert "2 breast(s) with one view dropped" in report.summary()


def test_single_view_breast_is_kept_and_flagged_under_duplicate_policy():
    encoded, report = get_task("cmmd_subtype4").encode(one_view_table())
    assert len(encoded) == 4  # no row copied: the loader fills the missing view
    assert encoded.groupby("patient_id")["single_view"].all().to_dict() == {"P1": False, "P2": True, "P3": True}
    assert report.single_view_breasts == 2 and report.single_view_policy == "duplicate"
    assert "kept (view duplicated at load time)" in report.summary()


def test_two_view_task_rejects_a_breast_with_conflicting_labels():
    table = breast_table([("P1", "L", "CC", "Luminal A"), ("P1", "L", "MLO", "Luminal B")])
    with pytest.raises(ValueError, match="different labels, e.g. patient P1 side L"):
        get_task("cmmd_subtype4").encode(table)


def test_single_view_task_keeps_only_its_view():
    table = breast_table([("P1", "L", "MLO", "F"), ("P1", "L", "CC", "F")]).rename(columns={"subtype": "tissue"})
    encoded, report = get_task("mias_density").encode(table)
    assert encoded["view"].tolist() == ["MLO"] and report.dropped == {"view not in MLO": 1}


def test_cxr_tasks_accept_the_spellings_of_each_source():
    table = pd.DataFrame({"patient_id": list("abcdefg"), "side": "", "view": "", "path": "/x.png",
                          "label": ["COVID", "Normal", "Viral Pneumonia", "covid", "no_findings", "pneumonia",
                                    "Lung_Opacity"]})
    with pytest.raises(ValueError, match="'Lung_Opacity'"):
        get_task("cxr_covid3").encode(table)
    encoded, _ = get_task("cxr_covid2").encode(table)
    assert encoded["target_name"].tolist() == ["covid", "other", "other", "covid", "other", "other", "other"]


def test_task_from_dict_validates_and_round_trips():
    config = {"name": "birads_high", "label_column": "breast_birads", "classes": ["low", "high"],
              "grouping": {"BI-RADS 1": "low", "BI-RADS 2": "low", "BI-RADS 3": None, "BI-RADS 4": "high",
                           "BI-RADS 5": "high"}}
    task = Task.from_dict(config)
    assert task.classes == ("low", "high") and task.views == ("CC", "MLO")
    assert Task.from_dict(task.to_dict()) == task
    table = breast_table([("P1", "L", "CC", "BI-RADS 3"), ("P2", "L", "CC", "BI-RADS 5")])
    table = table.rename(columns={"subtype": "breast_birads"})
    encoded, report = task.encode(table)
    assert encoded["target"].tolist() == [1] and report.dropped["label excluded by grouping"] == 1
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['clases'\]"):
        Task.from_dict({**config, "clases": []})
    with pytest.raises(ValueError, match=r"grouping maps to \['medium'\]"):
        Task.from_dict({**config, "grouping": {"BI-RADS 3": "medium"}})
    with pytest.raises(ValueError, match="single_view_policy"):
        Task.from_dict({**config, "single_view_policy": "copy"})


def test_a_task_refuses_a_table_of_another_modality():
    table = breast_table([("P1", "L", "CC", "covid")]).assign(modality="cxr")
    with pytest.raises(ValueError, match=r"cmmd_subtype4 is for mammo images, the table holds \['cxr'\]"):
        get_task("cmmd_subtype4").encode(table)


def test_missing_label_column_is_named():
    with pytest.raises(ValueError, match="no column 'subtype'"):
        get_task("cmmd_subtype4").encode(pd.DataFrame({"patient_id": ["P1"], "view": ["CC"]}))
