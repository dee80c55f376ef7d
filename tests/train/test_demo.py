"""The embedded default: the demo's own recipe must learn its synthetic subtypes, and reruns must not mix data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tlese.cli import main
from tlese.data.synth import SYNTH_VERSION, synthesize
from tlese.train.commands import DEMO_PATIENTS, demo_config_path
from tlese.train.config import load_experiment
from tlese.train.cv import run_cv
from tlese.train.rundir import PREDICTIONS_BREASTS


def test_demo_refuses_data_made_with_another_patient_count(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "synth_info.json").write_text(json.dumps({"n_patients": 12, "version": SYNTH_VERSION}))
    assert main(["demo", "--out", str(tmp_path), "--patients", str(DEMO_PATIENTS)]) == 2
    error = capsys.readouterr().err
    assert "synth_info.json" in error
    assert f"12 patients from generator version {SYNTH_VERSION}, not {DEMO_PATIENTS}" in error
    # data of an older generator (no version recorded) is refused too: the same seed draws different pixels now
    (data_dir / "synth_info.json").write_text(json.dumps({"n_patients": DEMO_PATIENTS}))
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "generator version 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_recipe_learns_the_synthetic_subtypes(tmp_path):
    """TLese with the demo's data, input size, recipe and folds beats chance clearly on out-of-fold breasts."""
    data = synthesize(tmp_path / "data", n_patients=DEMO_PATIENTS, seed=0)
    overrides = [f"target.root={data['mammo_root']}", f"cxr.root={data['cxr_root']}", f"output_dir={tmp_path / 'runs'}",
                 f"cache_dir={tmp_path / 'cache'}", "prepare_workers=1", "bootstrap=10",
                 "cxr_recipe.progress_bar=false", "target_recipe.progress_bar=false"]
    experiment = load_experiment(demo_config_path(), overrides)
    tlese_arm = experiment.arms[0]
    assert tlese_arm.model.startswith("tlese_") and tlese_arm.transfer == "double"
    run_dir = run_cv(experiment, arms=[tlese_arm.name])
    files = sorted((run_dir / tlese_arm.name).glob(f"fold_*/{PREDICTIONS_BREASTS}"))
    predictions = pd.concat(pd.read_csv(path) for path in files)
    assert len(predictions) >= 0.8 * DEMO_PATIENTS  # about 0.9 malignant breasts per patient
    probabilities = predictions.filter(like="prob_").to_numpy()
    macro_auc = roc_auc_score(predictions["target"], probabilities, multi_class="ovr")
    accuracy = (predictions["pred"] == predictions["target"]).mean()
    # chance: AUC 0.5, accuracy 0.25 (balanced subtypes); with ~54 breasts the AUC's null spread is about 0.05
    assert macro_auc > 0.7, f"macro AUC {macro_auc:.3f}"
    assert accuracy > 0.4, f"accuracy {accuracy:.3f}"


def test_finished_stages_keep_only_their_selected_checkpoint(tmp_path):
    from tlese.train.commands import prune_checkpoints
    from tlese.train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    arm = run.arm("a")

    def stage(stage_dir, selected="best.ckpt", done=True, predicted=True):
        stage_dir.checkpoints.mkdir(parents=True)
        (stage_dir.checkpoints / "best.ckpt").write_bytes(b"b" * 10)
        stage_dir.last_checkpoint.write_bytes(b"l" * 100)
        if done:
            stage_dir.done_file.write_text(json.dumps({"best_checkpoint": f"/elsewhere/{selected}"}))
        if predicted and hasattr(stage_dir, "record_file"):
            stage_dir.record_file.write_text("{}")
            stage_dir.image_predictions_file.write_text("fold\n")
        return stage_dir

    stage1 = stage(arm.stage1)
    finished = stage(arm.fold(0))
    trained_not_predicted = stage(arm.fold(1), predicted=False)
    last_is_selected = stage(arm.fold(2), selected="last.ckpt")
    interrupted = stage(arm.fold(3), done=False)
    assert prune_checkpoints(run, ["a"]) == 200
    assert not stage1.last_checkpoint.exists() and not finished.last_checkpoint.exists()
    for kept in (trained_not_predicted, last_is_selected, interrupted):  # still needed to resume or to predict
        assert kept.last_checkpoint.is_file()
    assert all((s.checkpoints / "best.ckpt").is_file() for s in (stage1, finished, trained_not_predicted))
    assert prune_checkpoints(run, ["a"]) == 0


def test_printed_commands_use_the_running_executable(tmp_path, monkeypatch):
    import sys

    from tlese.train.commands import tlese_command

    script = tmp_path / "my env" / "bin" / "tlese"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.chdir(script.parent.parent)
    monkeypatch.setattr(sys, "argv", ["bin/tlese", "demo"])
    assert tlese_command() == f"'{script.resolve()}'"  # absolute, and quoted for a shell (the space)
    monkeypatch.setattr(sys, "argv", ["/somewhere/pytest"])
    beside = Path(sys.executable).parent / "tlese"
    assert tlese_command() == (str(beside.absolute()) if beside.is_file() else "tlese")


@pytest.mark.slow
def test_the_demo_prints_its_results_signs_its_bundle_and_keeps_one_checkpoint_per_fold(tmp_path, capsys):
    """The demo end to end at toy size: one line per arm with the pooled macro AUC and its CI, a signed bundle whose
    printed predict command trusts the demo's key, only selected checkpoints left, the folder's size; a rerun
    reuses everything."""
    import os

    from tlese.bundle.format import BundleError, load_bundle
    from tlese.train.commands import tlese_command

    out = tmp_path / "demo"
    arms = ("[{name: via_cxr, model: lite0_plain, transfer: cxr}, "
            "{name: scratch, model: lite0_plain, transfer: scratch}]")
    command = ["demo", "--out", str(out), "--patients", "12", "--set", "image_size=32", "--set", "folds=2",
               "--set", "target_recipe.epochs=1", "--set", "cxr_recipe.epochs=1", "--set", "bootstrap=20",
               "--set", "prepare_workers=1", "--set", "target_recipe.progress_bar=false",
               "--set", "cxr_recipe.progress_bar=false", "--set", f"arms={arms}"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    result_lines = [line.strip() for line in printed.splitlines() if "pooled macro AUC" in line]
    assert [line.split(" ")[0] for line in result_lines] == ["via_cxr", "scratch"]
    comparison = pd.read_csv(out / "demo" / "comparison.csv")
    for line, value in zip(result_lines, comparison.filter(like="pooled").iloc[:, 0]):
        assert str(value) in line  # the number and CI of the report, over the held-out breasts
    predict = next(line.strip() for line in printed.splitlines() if " predict " in line)
    assert predict.startswith(f"{tlese_command()} predict ")
    public = out / "keys" / "tlese_signing.pub"
    assert f"--trusted-keys {public}" in predict
    assert os.stat(out / "keys" / "tlese_signing.pem").st_mode & 0o777 == 0o600
    bundle = load_bundle(out / "bundle", trusted_keys=public)
    assert bundle.signed and bundle.synthetic
    with pytest.raises(BundleError):
        load_bundle(out / "bundle", trusted_keys=[])  # no trusted key: refused
    assert f"disk: {out} holds" in printed
    for arm in ("via_cxr", "scratch"):
        folds = sorted((out / "demo" / arm).glob("fold_*/checkpoints/*.ckpt"))
        assert [path.name for path in folds] == ["best.ckpt", "best.ckpt"]
    assert [path.name for path in (out / "demo" / "via_cxr" / "stage1_cxr" / "checkpoints").iterdir()] == ["best.ckpt"]

    assert main(command) == 0  # a rerun: same data, folds, key and bundle
    again = capsys.readouterr().out
    assert [line.strip() for line in again.splitlines() if "pooled macro AUC" in line] == result_lines
    assert load_bundle(out / "bundle", trusted_keys=public).sha256 == bundle.sha256
