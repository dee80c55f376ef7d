"""A tiny end-to-end run of the method on generated data: stage 1 (CXR), k-fold stage 2, merge, report.

Tiny images and one epoch: these tests prove the plumbing (checkpoints, predictions for every test image,
no patient leakage, determinism, degenerate folds, DDP), not the accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tlese.data.splits import load_folds
from tlese.train.config import load_experiment
from tlese.train.cv import run_cv
from tlese.train.merge import merge_run
from tlese.train.rundir import PREDICTIONS_BREASTS, PREDICTIONS_IMAGES

pytestmark = pytest.mark.slow

RECIPE = {"epochs": 1, "batch_size": 8, "lr": 0.002, "warmup_epochs": 0.5, "progress_bar": False,
          "accelerator": "cpu", "val_fraction": 0.25}


@pytest.fixture(scope="module")
def synth(tiny_synth) -> dict:
    """The session's shared synthetic data (tests/conftest.py: 15 patients, 64 px, 6 chest X-rays per class)."""
    return tiny_synth


def write_config(path: Path, synth: dict, out: Path, **changes) -> Path:
    config = {
        "name": "tiny", "seed": 0, "output_dir": str(out), "cache_dir": str(out.parent / "cache"),
        "image_size": 32, "views": "dual", "folds": 3, "bootstrap": 50, "prepare_workers": 1,
        "target": {"adapter": "cmmd", "root": str(synth["mammo_root"]), "task": "synth_subtype4"},
        "cxr": {"adapter": "darkcovidnet", "root": str(synth["cxr_root"]), "task": "synth_cxr3"},
        "cxr_recipe": dict(RECIPE), "target_recipe": dict(RECIPE),
        "arms": [{"name": "tlese_double", "model": "tlese_lite0", "transfer": "double"},
                 {"name": "plain_scratch", "model": "lite0_plain", "transfer": "scratch"}],
    }
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def full_run(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    experiment = load_experiment(write_config(out / "exp.yaml", synth, out / "runs"))
    return run_cv(experiment)


def test_every_test_image_is_predicted_once_with_checkpoints(full_run):
    images = load_folds(full_run / "folds_seed0_k3.csv")
    for arm in ("tlese_double", "plain_scratch"):
        predictions = pd.concat([pd.read_csv(p) for p in sorted((full_run / arm).glob(f"fold_*/{PREDICTIONS_IMAGES}"))])
        breasts = pd.concat([pd.read_csv(p) for p in sorted((full_run / arm).glob(f"fold_*/{PREDICTIONS_BREASTS}"))])
        assert sorted(predictions["fold"].unique()) == [0, 1, 2]
        assert predictions["image_id"].is_unique and set(predictions["patient_id"]) == set(images["patient_id"])
        assert len(breasts) == len(predictions.groupby(["patient_id", "side"]))
        assert ((breasts.filter(like="prob_").sum(axis=1) - 1).abs() < 1e-4).all()
        for fold in range(3):
            assert (full_run / arm / f"fold_{fold}" / "checkpoints" / "best.ckpt").is_file()
    assert (full_run / "tlese_double" / "stage1_cxr" / "checkpoints" / "best.ckpt").is_file()


def test_no_test_patient_in_its_training_or_validation_data(full_run):
    folds = load_folds(full_run / "folds_seed0_k3.csv")
    for fold_dir in sorted(full_run.glob("*/fold_*")):
        fold = int(fold_dir.name.split("_")[1])
        split = pd.read_csv(fold_dir / "split.csv")
        predicted = set(pd.read_csv(fold_dir / PREDICTIONS_IMAGES)["patient_id"])
        trained_on = set(split.loc[split["role"].isin(["train", "val"]), "patient_id"])
        assert predicted and not predicted & trained_on
        assert predicted == set(folds.loc[folds["fold"] == fold, "patient_id"])


def test_cxr_backbone_reaches_the_mammography_model(full_run):
    info = json.loads((full_run / "tlese_double" / "fold_0" / "fold_info.json").read_text())
    assert info["init"]["imagenet"] == "loaded"
    assert info["init"]["cxr_load_summary"].startswith("loaded ")
    # each fold records the code and threads it ran with (arms of one run may come from different jobs)
    assert {"git_commit", "git_dirty", "torch", "torch_threads"} <= set(info["run_by"])



def test_stage1_checkpoints_carry_the_chest_xray_model_spec(full_run):
    import torch

    from tlese.data.tasks import get_task
    from tlese.models.spec import CHECKPOINT_KEY, ModelSpec

    stage1 = full_run / "tlese_double" / "stage1_cxr"
    saved = torch.load(stage1 / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(saved[CHECKPOINT_KEY])
    assert spec.registry_name == "tlese_lite0" and spec.views == "single"
    assert spec.class_names == list(get_task("synth_cxr3").classes) and spec.create_kwargs["num_classes"] == 3
    assert (spec.preprocess["modality"], spec.image_size) == ("cxr", 32)
    assert json.loads((stage1 / "stage_summary.json").read_text())["model_spec"] == saved[CHECKPOINT_KEY]


def test_merge_writes_report_and_comparison(full_run):
    paths = merge_run(full_run)
    html = paths["html"].read_text()
    assert "tlese_double" in html and "plain_scratch" in html and "Luminal A" in html
    comparison = pd.read_csv(full_run / "comparison.csv")
    assert list(comparison["arm"]) == ["tlese_double", "plain_scratch"]
    assert list(comparison["ImageNet weights"]) == ["loaded", "not used"]  # what the folds really started from
    assert (full_run / "tlese_double" / "report.md").is_file()
    paired = pd.read_csv(full_run / "paired_tests.csv")
    assert set(paired["reference"]) == {"tlese_double"}  # by default, the config's first arm
    bootstrap = paired[paired["test"] == "paired patient bootstrap"]
    assert (bootstrap["p_holm_pairs"] == bootstrap["p_value"]).all()  # one pair: nothing to adjust
    assert paired.loc[paired["test"] != "paired patient bootstrap", "p_holm_pairs"].isna().all()


def test_merge_tests_against_a_chosen_reference(full_run):
    merge_run(full_run, references=["plain_scratch"])
    paired = pd.read_csv(full_run / "paired_tests.csv")
    assert set(paired["reference"]) == {"plain_scratch"} and set(paired["model"]) == {"tlese_double"}
    with pytest.raises(ValueError, match="reference arm\\(s\\) \\['nope'\\] have no predictions"):
        merge_run(full_run, references=["nope"])


def test_gradcam_overlays_explain_only_held_out_cases(full_run):
    from tlese.train.trained import explain_fold

    out = explain_fold(full_run, "tlese_double", 0, per_class=1)
    index = pd.read_csv(out / "index.csv")
    assert 1 <= len(index) <= 4 and index["true"].is_unique  # at most one case per true class
    assert all((out / name).is_file() for name in index["file"])
    split = pd.read_csv(full_run / "tlese_double" / "fold_0" / "split.csv")
    assert set(index["patient_id"]) <= set(split.loc[split["role"] == "test", "patient_id"])


def test_same_seed_same_predictions(full_run, synth, tmp_path):
    experiment = load_experiment(write_config(tmp_path / "exp.yaml", synth, tmp_path / "runs"))
    again = run_cv(experiment, arms=["plain_scratch"], fold=1)
    columns = ["patient_id", "side", "view", "prob_Luminal A", "prob_Luminal B"]
    first = pd.read_csv(full_run / "plain_scratch" / "fold_1" / PREDICTIONS_IMAGES)[columns]
    second = pd.read_csv(again / "plain_scratch" / "fold_1" / PREDICTIONS_IMAGES)[columns]
    pd.testing.assert_frame_equal(first, second)


def test_a_fold_without_a_class_warns_and_still_reports(full_run, synth, tmp_path):
    # Put every triple-negative patient in fold 0: folds 1 and 2 then have none to test on.
    folds = load_folds(full_run / "folds_seed0_k3.csv")
    predictions = pd.concat(pd.read_csv(p) for p in (full_run / "plain_scratch").glob(f"fold_*/{PREDICTIONS_BREASTS}"))
    tn_patients = set(predictions.loc[predictions["target"] == 3, "patient_id"])
    folds.loc[folds["patient_id"].isin(tn_patients), "fold"] = 0
    folds_file = tmp_path / "folds.csv"
    folds.to_csv(folds_file, index=False)
    arms = [{"name": "plain_scratch", "model": "lite0_plain", "transfer": "scratch"}]
    experiment = load_experiment(write_config(tmp_path / "exp.yaml", synth, tmp_path / "runs",
                                              folds_file=str(folds_file), arms=arms))
    with pytest.warns(UserWarning):
        run_dir = run_cv(experiment, fold=1)
    report = merge_run(run_dir)["md"].read_text()
    assert "triple negative" in report and "absent" in report


def test_two_process_ddp_on_cpu(synth, tmp_path):
    config = write_config(tmp_path / "exp.yaml", synth, tmp_path / "runs",
                          arms=[{"name": "plain_scratch", "model": "lite0_plain", "transfer": "scratch"}])
    command = [sys.executable, "-m", "tlese.cli", "cv", "--config", str(config), "--fold", "0",
               "--set", "target_recipe.devices=2", "--set", "target_recipe.strategy=ddp"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    fold_dir = tmp_path / "runs" / "tiny" / "plain_scratch" / "fold_0"
    assert (fold_dir / PREDICTIONS_IMAGES).is_file()
    assert json.loads((fold_dir / "fold_info.json").read_text())["world_size"] == 2  # two processes trained it
