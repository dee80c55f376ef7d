"""Repeated k-fold CV: each repeat its own patient-level folds (saved) and training seed, stage 1 once per arm and
seed, one job per (repeat, fold), merge over whatever has finished, reruns reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tlese.data.splits import load_folds
from tlese.train.config import ConfigError, load_experiment
from tlese.train.cv import run_cv
from tlese.train.rundir import RunDir, repeat_seed

pytestmark = pytest.mark.slow

RECIPE = {"epochs": 1, "batch_size": 8, "lr": 0.002, "warmup_epochs": 0.5, "progress_bar": False,
          "accelerator": "cpu", "val_fraction": 0.25}
SCRATCH = {"name": "plain_scratch", "model": "lite0_plain", "transfer": "scratch"}
CXR_ARM = {"name": "plain_cxr", "model": "lite0_plain", "transfer": "cxr"}


@pytest.fixture(scope="module")
def synth(tiny_synth) -> dict:
    """The session's shared synthetic data (tests/conftest.py)."""
    return tiny_synth


def config_file(folder: Path, synth: dict, name: str = "rep", **changes) -> Path:
    config = {
        "name": name, "seed": 0, "output_dir": str(folder / "runs"), "cache_dir": str(folder / "cache"),
        "image_size": 32, "views": "dual", "folds": 3, "repeats": 2, "bootstrap": 20, "prepare_workers": 1,
        "target": {"adapter": "cmmd", "root": str(synth["mammo_root"]), "task": "synth_subtype4"},
        "cxr": {"adapter": "darkcovidnet", "root": str(synth["cxr_root"]), "task": "synth_cxr3"},
        "cxr_recipe": dict(RECIPE), "target_recipe": dict(RECIPE), "arms": [SCRATCH, CXR_ARM],
    }
    config.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def repeated(synth, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repeated")
    return run_cv(load_experiment(config_file(folder, synth)))


def test_two_repeats_draw_different_patient_level_folds_and_save_both(repeated):
    run = RunDir(repeated)
    first, second = run.folds_file(repeat_seed(0, 0), 3), run.folds_file(repeat_seed(0, 1), 3)
    assert first.name == "folds_seed0_k3.csv" and second.name == "folds_seed1000_k3.csv"
    folds_a, folds_b = load_folds(first), load_folds(second)
    assert set(folds_a["patient_id"]) == set(folds_b["patient_id"])
    assert folds_a.groupby("patient_id")["fold"].nunique().max() == 1  # patient-level in each repeat
    pairs_a = folds_a.set_index("patient_id")["fold"]
    pairs_b = folds_b.set_index("patient_id")["fold"].reindex(pairs_a.index)
    # Another partition, not a relabelling of the same one: some two patients together in one are apart in the other.
    together_a = {(p, q) for p in pairs_a.index for q in pairs_a.index if p < q and pairs_a[p] == pairs_a[q]}
    together_b = {(p, q) for p in pairs_b.index for q in pairs_b.index if p < q and pairs_b[p] == pairs_b[q]}
    assert together_a != together_b
    assert (repeated / "data_summary.csv").is_file() and (repeated / "data_summary_repeat1.csv").is_file()


def test_each_repeat_trains_with_its_own_seed_and_stage1_once_per_seed(repeated):
    run = RunDir(repeated)
    for arm in ("plain_scratch", "plain_cxr"):
        assert run.arm_repeats(arm) == [0, 1]
        for repeat in (0, 1):
            arm_dir = run.arm(arm, repeat)
            for fold_dir in arm_dir.folds():
                record = fold_dir.record()
                assert record["repeat"] == repeat and record["seed"] == repeat_seed(0, repeat) + fold_dir.fold
                split = fold_dir.split()
                folds = load_folds(run.folds_file(repeat_seed(0, repeat), 3))
                assert fold_dir.test_patients() == set(folds.loc[folds["fold"] == fold_dir.fold, "patient_id"])
                assert set(split["role"]) == {"train", "val", "test"}
    stage1 = [run.arm("plain_cxr", repeat).stage1 for repeat in (0, 1)]
    assert all(stage.is_done() for stage in stage1)
    assert [stage.made_from()["seed"] for stage in stage1] == [0, 1000]
    assert not run.arm("plain_scratch", 0).stage1.path.exists()
    # Each fold of a repeat started from that repeat's stage 1 (its checksum), not the other's.
    for repeat, stage in enumerate(stage1):
        sha = json.loads((stage.path / "stage_summary.json").read_text())["best_sha256"]
        cxr_arm = run.arm("plain_cxr", repeat)
        assert {fold_dir.record()["init"]["cxr_sha256"] for fold_dir in cxr_arm.folds()} == {sha}


def test_a_rerun_of_one_repeat_reproduces_its_predictions(synth, repeated, tmp_path):
    again = run_cv(load_experiment(config_file(tmp_path, synth)), arms=["plain_cxr"], repeat=1)
    for fold in range(3):
        ours = RunDir(again).arm("plain_cxr", 1).fold(fold).image_predictions_file.read_bytes()
        theirs = RunDir(repeated).arm("plain_cxr", 1).fold(fold).image_predictions_file.read_bytes()
        assert ours == theirs
    assert not RunDir(again).arm("plain_cxr", 0).folds()  # only the repeat asked for ran


def test_repeats_are_checked_and_a_fold_file_cannot_fix_all_repeats(synth, tmp_path):
    with pytest.raises(ConfigError, match="repeats must be >= 1"):
        load_experiment(config_file(tmp_path, synth, repeats=0))
    with pytest.raises(ConfigError, match="folds_file fixes one partition"):
        load_experiment(config_file(tmp_path, synth, folds_file=str(tmp_path / "f.csv")))
    with pytest.raises(ValueError, match="repeat 5 does not exist"):
        run_cv(load_experiment(config_file(tmp_path, synth)), repeat=5)


def test_repeats_added_to_a_finished_single_run_keep_it_as_repeat_0(synth, tmp_path):
    single = run_cv(load_experiment(config_file(tmp_path, synth, repeats=1, arms=[SCRATCH])), fold=0)
    before = RunDir(single).arm("plain_scratch").fold(0).image_predictions_file.read_bytes()
    run_cv(load_experiment(config_file(tmp_path, synth, repeats=2, arms=[SCRATCH])), fold=0, repeat=1)
    assert RunDir(single).arm("plain_scratch").fold(0).image_predictions_file.read_bytes() == before
    assert yaml.safe_load(RunDir(single).config_file.read_text())["repeats"] == 2
    assert RunDir(single).arm_repeats("plain_scratch") == [0, 1]
    assert pd.read_csv(RunDir(single).arm("plain_scratch", 1).fold(0).image_predictions_file).shape[0] > 0


def test_merge_over_repeats_reports_each_repeat_and_tests_the_arms(repeated):
    from tlese.train.merge import merge_run

    report = merge_run(repeated, references=["plain_scratch"])["md"].read_text()
    per_repeat = pd.read_csv(repeated / "repeats.csv")
    assert sorted(map(tuple, per_repeat[["arm", "repeat"]].to_numpy())) == [
        ("plain_cxr", 0), ("plain_cxr", 1), ("plain_scratch", 0), ("plain_scratch", 1)]
    assert per_repeat["complete"].all() and (per_repeat["folds"] == 3).all()
    summary = pd.read_csv(repeated / "repeat_summary.csv")
    assert set(summary["arm"]) == {"plain_cxr", "plain_scratch"}
    tests = pd.read_csv(repeated / "repeat_tests.csv")
    corrected = tests[(tests["test"] == "corrected resampled t-test") & (tests["metric"] == "accuracy")].iloc[0]
    assert corrected["model"] == "plain_cxr" and corrected["n_units"] == 6
    folds = pd.read_csv(repeated / "repeat_folds.csv").set_index(["arm", "repeat", "fold"])["accuracy"]
    diffs = (folds.loc["plain_cxr"] - folds.loc["plain_scratch"]).to_numpy()
    assert corrected["diff"] == pytest.approx(diffs.mean())
    bootstrap = tests[tests["test"] == "paired patient bootstrap"]
    assert set(bootstrap["repeat"].astype(int)) == {0, 1}
    assert "Corrected resampled t-test" in report and "repeats_macro_auc.png" in report
    assert (repeated / "plots" / "repeats_accuracy.png").stat().st_size > 1000


def test_a_missing_repeat_fold_job_leaves_merge_reporting_the_rest_and_naming_it(repeated, tmp_path):
    import shutil

    from tlese.train.merge import merge_run

    copy = tmp_path / "copy"
    shutil.copytree(repeated, copy)
    (RunDir(copy).arm("plain_cxr", 1).fold(2).record_file).unlink()  # that job never finished
    report = merge_run(copy, references=["plain_scratch"])["md"].read_text()
    assert "plain_cxr: repeat 1 fold 2" in report
    per_repeat = pd.read_csv(copy / "repeats.csv").set_index(["arm", "repeat"])
    assert not per_repeat.loc[("plain_cxr", 1), "complete"] and per_repeat.loc[("plain_cxr", 1), "folds"] == 2
    assert per_repeat.loc[("plain_scratch", 1), "complete"]
    summary = pd.read_csv(copy / "repeat_summary.csv").set_index("arm")
    assert summary.loc["plain_cxr", "n_repeats"] == 1  # the partial repeat is shown, not averaged in
    tests = pd.read_csv(copy / "repeat_tests.csv")
    corrected = tests[(tests["test"] == "corrected resampled t-test") & (tests["metric"] == "accuracy")].iloc[0]
    assert corrected["n_units"] == 5 and corrected["n_dropped"] == 1


def test_a_log_damaged_by_kill_9_mid_rewrite_is_read_without_its_bad_rows(tmp_path):
    from tlese.train.engine import read_history

    (tmp_path / "logs" / "version_0").mkdir(parents=True)
    (tmp_path / "logs" / "version_1").mkdir(parents=True)
    # Lightning rewrote the file with a new column and was killed: a short header, then a longer row.
    (tmp_path / "logs" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train_loss,val_loss,val_acc\n0,3,1.2,1.1,0.5\n1,7,1.0,0.9,0.6,0.7\n")
    (tmp_path / "logs" / "version_1" / "metrics.csv").write_text("epoch,step,train_loss\n2,11,0.8\n")
    with pytest.warns(UserWarning, match="damaged log"):
        history = read_history(tmp_path)
    assert list(history["epoch"]) == [0, 2]
