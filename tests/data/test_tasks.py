"""Tasks: label mapping, policies for unknown labels and single-view breasts, registry and dict configs."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from tlese.data.tasks import Task, TaskFieldError, get_task, list_tasks, register_task


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
    with pytest.raises(ValueError, match=r"task\.grouping: maps to \['medium'\]"):
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


# ----------------------------------------------------------------------------------- tasks defined in an experiment

LUMINAL_INLINE = {  # the registry's cmmd_luminal, written in YAML instead of Python
    "name": "luminal_inline", "label_column": "subtype", "classes": ["luminal", "non_luminal"],
    "grouping": {"Luminal A": "luminal", "Luminal B": "luminal", "HER2-enriched": "non_luminal",
                 "triple negative": "non_luminal"},
}
MIAS_DENSITY_INLINE = {"name": "density_inline", "label_column": "tissue", "classes": ["F", "G", "D"],
                       "views": ["MLO"]}


def experiment_file(tmp_path, task, cxr_task=None):
    data = {"target": {"adapter": "cmmd", "root": "data", "task": task},
            "arms": [{"name": "a", "model": "tlese_lite0", "transfer": "imagenet"}]}
    if cxr_task is not None:
        data["cxr"] = {"adapter": "darkcovidnet", "root": "cxr", "task": cxr_task}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def same_task(a: Task, b: Task) -> bool:
    """Equal but for name and description."""
    return {**a.to_dict(), "name": "", "description": ""} == {**b.to_dict(), "name": "", "description": ""}


@pytest.mark.parametrize("inline, registered", [(LUMINAL_INLINE, "cmmd_luminal"),
                                                (MIAS_DENSITY_INLINE, "mias_density")])
def test_an_experiment_may_define_its_task_inline(tmp_path, inline, registered):
    from tlese.train.config import dump_experiment, load_experiment

    experiment = load_experiment(experiment_file(tmp_path, inline))
    task = get_task(experiment.target.task)  # what train/, merge and explain call
    reference = get_task(registered)
    assert task.name == inline["name"] and same_task(task, reference)
    assert (task.classes, task.label_column, task.views) == (reference.classes, reference.label_column, reference.views)
    dump_experiment(experiment, tmp_path / "again.yaml")  # an inline task survives a dump and a reload
    assert get_task(load_experiment(tmp_path / "again.yaml").target.task) == task


def test_an_inline_task_encodes_as_the_registered_one():
    table = breast_table([("P1", "L", "CC", "Luminal B"), ("P1", "L", "MLO", "Luminal B"),
                          ("P2", "R", "CC", "triple negative"), ("P2", "R", "MLO", "triple negative")])
    ours, _ = get_task(LUMINAL_INLINE).encode(table)
    theirs, _ = get_task("cmmd_luminal").encode(table)
    pd.testing.assert_frame_equal(ours, theirs)


def test_get_task_takes_a_name_a_mapping_or_a_task():
    task = get_task("mias_density")
    assert get_task(task) is task and get_task(task.to_dict()) == task
    with pytest.raises(ValueError, match="a task is a registered name or a mapping"):
        get_task(["mias_density"])


@pytest.mark.parametrize("change, match", [
    ({"clases": ["a", "b"]}, r"target\.task: unknown key\(s\) \['clases'\]; valid: \['name', 'label_column', "
                            r"'classes'"),
    ({"views": "MLO"}, r"target\.task\.views: expected a list of strings, got 'MLO'"),
    ({"views": ["MLO", "ML"]}, r"target\.task\.views: expected distinct views from \['CC', 'MLO', 'any'\]"),
    ({"classes": "FGD"}, r"target\.task\.classes: expected a list of strings"),
    ({"classes": [1, 2]}, r"target\.task\.classes: expected non-empty strings \(quote numbers in YAML\)"),
    ({"grouping": {"B": "benign"}}, r"target\.task\.grouping: maps to \['benign'\], which are not in classes"),
    ({"grouping": ["F"]}, r"target\.task\.grouping: expected a mapping"),
    ({"modality": "mri"}, r"target\.task\.modality: 'mri' is not one of \['mammo', 'cxr'\]"),
    ({"single_view_policy": "copy"}, r"target\.task\.single_view_policy: 'copy' is not one of"),
    ({"label_column": ""}, r"target\.task\.label_column: expected a non-empty string"),
])
def test_a_bad_inline_task_fails_at_load_naming_the_key(tmp_path, change, match):
    from tlese.train.config import ConfigError, load_experiment

    with pytest.raises(ConfigError, match=match):
        load_experiment(experiment_file(tmp_path, {**MIAS_DENSITY_INLINE, **change}))


def test_task_errors_at_load_name_the_source(tmp_path):
    from tlese.train.config import ConfigError, load_experiment

    missing = {k: v for k, v in MIAS_DENSITY_INLINE.items() if k != "label_column"}
    with pytest.raises(ConfigError, match=r"target\.task: missing key\(s\) \['label_column'\]"):
        load_experiment(experiment_file(tmp_path, missing))
    with pytest.raises(ConfigError, match=r"exp\.yaml: target\.task: unknown task 'mias_densty'; valid: .*mias_dens"):
        load_experiment(experiment_file(tmp_path, "mias_densty"))
    with pytest.raises(ConfigError, match=r"cxr\.task\.modality: 'x-ray' is not one of"):
        load_experiment(experiment_file(tmp_path, "mias_density",
                                        cxr_task={**MIAS_DENSITY_INLINE, "modality": "x-ray"}))
    with pytest.raises(ConfigError, match=r"target\.task: expected"):
        load_experiment(experiment_file(tmp_path, ["mias_density"]))


def test_a_task_built_in_python_names_the_bad_field():
    with pytest.raises(TaskFieldError, match=r"task t: views: expected distinct views") as error:
        Task("t", "label", ("a", "b"), views=("CC", "CC"))
    assert error.value.key == "views"


# ---------------------------------------------------------------------------------------------------------------
# resolve_task: what `--task` accepts on the command line


HER2 = {"name": "her2", "label_column": "subtype", "classes": ["other", "HER2"],
        "grouping": {"Luminal A": "other", "Luminal B": "other", "triple negative": "other", "HER2-enriched": "HER2"}}


def test_resolve_task_takes_a_name_a_file_or_an_inline_mapping(tmp_path):
    import json

    from tlese.data.tasks import resolve_task

    assert resolve_task("cmmd_subtype4") is get_task("cmmd_subtype4")
    expected = Task.from_dict(HER2)
    yaml_file, json_file = tmp_path / "her2.yaml", tmp_path / "her2.json"
    yaml_file.write_text(yaml.safe_dump(HER2))
    json_file.write_text(json.dumps(HER2))
    inline = ("{name: her2, label_column: subtype, classes: [other, HER2], grouping: {Luminal A: other, "
              "Luminal B: other, triple negative: other, HER2-enriched: HER2}}")
    for value in (str(yaml_file), str(json_file), inline, json.dumps(HER2), yaml.safe_dump(HER2), HER2, expected):
        assert resolve_task(value) == expected


@pytest.mark.parametrize("value, error, match", [
    ("nope", ValueError, r"unknown task 'nope'; valid: .*cmmd_subtype4.* \(or a YAML file path, or an inline"),
    ("tasks/missing.yaml", FileNotFoundError, r"tasks/missing.yaml: task file not found"),
    ("{name: x, classes: [a, b", ValueError, r"inline task: YAML syntax error at line 1, column \d+"),
    ("{name: x, label_column: y, classes: [a, b], colour: red}", ValueError,
     r"inline task: unknown key\(s\) \['colour'\]"),
    ("{name: x, label_column: y, classes: [a]}", ValueError, r"inline task.classes: must be at least two"),
])
def test_resolve_task_errors_name_the_source(value, error, match):
    from tlese.data.tasks import resolve_task

    with pytest.raises(error, match=match):
        resolve_task(value)


def test_a_bad_task_file_is_named_with_its_line(tmp_path):
    from tlese.data.tasks import resolve_task

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nclasses: [a, b\nlabel_column: y\n")
    with pytest.raises(ValueError, match=rf"{path}: YAML syntax error at line 3, column \d+"):
        resolve_task(str(path))


def test_the_task_of_docs_architecture_resolves(tmp_path):
    from pathlib import Path

    from tlese.data.tasks import resolve_task

    docs = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    block = docs.split("**A task.**")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "her2.yaml").write_text(block)
    task = resolve_task(str(tmp_path / "her2.yaml"))
    assert task.classes == ("other", "HER2") and task.class_of("HER2-enriched") == "HER2"
