"""`tlese evaluate`: a bundle on a labelled external set, through the same path as `tlese predict`.

The tiny bundle is evaluated on the synthetic CMMD set it was trained on: fine for plumbing, and exactly the case the
report's training-overlap warning is for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from tlese.predict.validate import TRAINING_OVERLAP_WARNING, evaluate_bundle


@pytest.fixture(scope="module")
def external_set(tiny_synth, tmp_path_factory) -> tuple[Path, tuple[str, str], tuple[str, str]]:
    """A copy of the synthetic CMMD folder with every image of one labelled breast made FOR PROCESSING (which
    predict refuses) and one image of another (degraded: one view left); returns the folder, the refused breast's
    (patient, side) and the degraded one's."""
    from tlese.data.datasets import get_adapter
    from tlese.data.tasks import get_task

    root = tmp_path_factory.mktemp("external") / "cmmd"
    shutil.copytree(tiny_synth["mammo_root"], root)
    encoded, _ = get_task("synth_subtype4").encode(get_adapter("cmmd")(root))
    breasts = encoded.groupby(["patient_id", "side"])["path"].agg(list)
    two_view = breasts[breasts.map(len) >= 2]
    (refused, refused_paths), (degraded, degraded_paths) = list(two_view.items())[:2]
    for path in [*refused_paths, degraded_paths[0]]:
        ds = pydicom.dcmread(path)
        ds.PresentationIntentType = "FOR PROCESSING"
        ds.save_as(path)
    return root, tuple(map(str, refused)), tuple(map(str, degraded))


@pytest.fixture(scope="module")
def evaluated(tiny_bundle, external_set, tmp_path_factory) -> dict:
    root = external_set[0]
    return evaluate_bundle(tiny_bundle, "cmmd", root, "synth_subtype4", tmp_path_factory.mktemp("evaluation") / "out",
                           n_boot=20, seed=0)


def test_report_has_macro_auc_calibration_plot_and_the_external_evaluation_statement(evaluated, tiny_bundle):
    from tlese.bundle.format import load_bundle

    sha = load_bundle(tiny_bundle).sha256
    for name in ("md", "html", "predictions_csv", "calibration_plot", "raw_calibration_plot", "evaluation_json"):
        assert Path(evaluated[name]).is_file(), name
    markdown = Path(evaluated["md"]).read_text()
    html = Path(evaluated["html"]).read_text()
    for text in (markdown, html):
        assert "macro_auc" in text
        assert f"External evaluation of bundle {sha} on cmmd" in text
        assert TRAINING_OVERLAP_WARNING in text
        assert "raw (uncalibrated) macro AUC" in text
    assert "plots/calibration.png" in markdown
    assert Path(evaluated["calibration_plot"]).name == "calibration.png"
    assert html.count("data:image/png;base64,") >= 4  # ROC, confusion matrix, two reliability diagrams


def test_breasts_evaluated_are_the_labelled_ones_minus_the_refused(evaluated, external_set):
    from tlese.data.datasets import get_adapter
    from tlese.data.tasks import get_task

    root, refused_breast, degraded_breast = external_set
    encoded, _ = get_task("synth_subtype4").encode(get_adapter("cmmd")(root))
    labelled = encoded.groupby(["patient_id", "side"]).ngroups
    summary = json.loads(Path(evaluated["evaluation_json"]).read_text())
    predictions = pd.read_csv(evaluated["predictions_csv"], dtype={"patient_id": str})
    assert summary["labelled_breasts"] == labelled
    assert summary["refused"] >= 1
    assert summary["evaluated_breasts"] == len(predictions) == labelled - summary["refused"]
    assert summary["ok"] + summary["degraded"] == len(predictions)
    keys = set(zip(predictions["patient_id"], predictions["side"]))
    assert refused_breast not in keys
    assert summary["degraded"] >= 1
    assert predictions.set_index(["patient_id", "side"]).loc[degraded_breast, "verdict"] == "degraded"
    assert any("FOR PROCESSING" in reason for reason in summary["refused_reasons"])
    markdown = Path(evaluated["md"]).read_text()
    assert "excluded from the metrics" in markdown and "refused:" in markdown
    # calibrated and raw probabilities both kept, each a distribution
    probs = predictions[[c for c in predictions.columns if c.startswith("prob_")]].to_numpy()
    raw = predictions[[c for c in predictions.columns if c.startswith("raw_prob_")]].to_numpy()
    assert probs.shape == raw.shape and probs.shape[1] == 4
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6) and np.allclose(raw.sum(axis=1), 1, atol=1e-6)


def test_a_task_with_other_classes_is_refused(tiny_bundle, tiny_synth, tmp_path):
    with pytest.raises(ValueError, match="bundle predicts"):
        evaluate_bundle(tiny_bundle, "cmmd", tiny_synth["mammo_root"], "cmmd_luminal", tmp_path / "out")
    from tlese.data.tasks import get_task

    task = get_task("synth_subtype4").to_dict()
    task.update(name="reordered", classes=list(reversed(task["classes"])))
    with pytest.raises(ValueError, match="different order"):
        evaluate_bundle(tiny_bundle, "cmmd", tiny_synth["mammo_root"], task, tmp_path / "out2")
    assert not (tmp_path / "out").exists()


def test_plot_calibration_writes_a_png(tmp_path):
    from tlese.evaluate.report import plot_calibration

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=50)
    path = plot_calibration(rng.integers(0, 3, 50), probs, ["a", "b", "c"], tmp_path / "cal.png", bins=5)
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_calibration([0], probs[:1, :2], ["a", "b", "c"], tmp_path / "bad.png")


def test_cli_runs(tiny_bundle, external_set, tmp_path, capsys):
    from tlese.cli import main

    root = external_set[0]
    out = tmp_path / "cli"
    assert main(["evaluate", str(tiny_bundle), "--dataset", "cmmd", "--root", str(root), "--task", "synth_subtype4",
                 "--out", str(out), "--bootstrap", "10"]) == 0
    printed = capsys.readouterr().out
    assert "external evaluation of bundle" in printed and "WARNING" in printed
    assert (out / "report.html").is_file() and (out / "plots" / "calibration.png").is_file()


@pytest.mark.slow
def test_evaluate_on_mini_mias_pngs_through_the_adapters_table(mias_dir, tmp_path, capsys):
    """A PNG set: side and view come from the adapter's table (written as predict's manifest), so the breasts are
    evaluated, not refused as 'PNG without a manifest'. The task defaults to the bundle's own."""
    import yaml

    from tlese.bundle.format import load_bundle
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_cv
    from tlese.train.release import make_bundle

    recipe = {"epochs": 1, "batch_size": 16, "lr": 0.002, "warmup_epochs": 0.5, "progress_bar": False,
              "accelerator": "cpu", "val_fraction": 0.25}
    config = {"name": "mias_tiny", "seed": 0, "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "c"),
              "image_size": 32, "views": "single", "folds": 2, "bootstrap": 10, "prepare_workers": 1,
              "target": {"adapter": "mias", "root": str(mias_dir), "task": "mias_density"},
              "target_recipe": recipe, "arms": [{"name": "plain_scratch", "model": "lite0_plain",
                                                 "transfer": "scratch"}]}
    (tmp_path / "mias.yaml").write_text(yaml.safe_dump(config))
    run = run_cv(load_experiment(tmp_path / "mias.yaml"))
    bundle = load_bundle(make_bundle(run, "plain_scratch", tmp_path / "bundle"), allow_unsigned=True)
    assert bundle.views == "single"
    paths = evaluate_bundle(bundle, "mias", mias_dir, None, tmp_path / "out", n_boot=10, seed=0)
    evaluation = json.loads(paths["evaluation_json"].read_text())
    assert evaluation["task"] == "mias_density"
    assert evaluation["evaluated_breasts"] > 0.9 * evaluation["labelled_breasts"] > 0
    assert not any("without a manifest" in reason for reason in evaluation["refused_reasons"])
    document = json.loads((paths["predict_dir"] / "predictions.json").read_text())
    assert document["bundle"]["views_read"] == ["MLO"]
    # an MLO-only bundle given MLO images: no "CC view missing" (a breast is degraded only for another reason)
    assert not any("missing" in reason for breast in document["breasts"].values() for reason in breast["reasons"])
    manifest = pd.read_csv(paths["manifest"])
    assert list(manifest.columns) == ["patient", "side", "view", "path"] and set(manifest["view"]) == {"MLO"}
    assert paths["manifest"].stat().st_mode & 0o777 == 0o600
