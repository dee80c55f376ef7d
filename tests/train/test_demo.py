"""The embedded default: the demo's own recipe must learn its synthetic subtypes, and reruns must not mix data."""

from __future__ import annotations

import json

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
