"""The bundle maker (`tlese.train.release.make_bundle`, `tlese bundle`): what a finished run's arm becomes, copied from
what training recorded (never recomputed from the YAML), calibrated and OOD-fitted for the ensemble that predicts,
carrying its checked ONNX files, saying when it was trained on synthetic data, and signed on request."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from exam_helpers import edit_json, load_unsigned

slow = pytest.mark.slow
TINY_ARM = "plain_scratch"  # the arm of tests/conftest.py's tiny_run



def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))



# ---------------------------------------------------------------------------------------------------------------
# No training needed


def test_synthetic_data_is_recognised_by_the_generators_record_or_the_task(tmp_path):
    from tlese.data.tasks import get_task
    from tlese.train.config import DataSource, Experiment
    from tlese.train.release import SYNTH_MARKER, synthetic_origin

    data = tmp_path / "data"
    (data / "cmmd").mkdir(parents=True)
    experiment = Experiment(target=DataSource(adapter="cmmd", root=str(data / "cmmd"), task="cmmd_subtype4"))
    synthetic_task, real_task = get_task("synth_subtype4"), get_task("cmmd_subtype4")
    assert "synth_subtype4" in synthetic_origin(experiment, synthetic_task)
    assert synthetic_origin(experiment, real_task) is None  # a real task on data with no generator record
    (data / SYNTH_MARKER).write_text(json.dumps({"generator": "tlese.data.synth.synthesize", "version": 2}))
    assert SYNTH_MARKER in synthetic_origin(experiment, real_task)  # what `tlese synth` wrote beside the data
    (data / SYNTH_MARKER).write_text(json.dumps({"generator": "somebody else"}))
    assert synthetic_origin(experiment, real_task) is None


# ---------------------------------------------------------------------------------------------------------------
# The session's tiny bundle (tests/conftest.py)


@slow
def test_the_bundle_copies_the_model_spec_the_folds_recorded(tiny_bundle, tiny_run):
    from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams
    from tlese.train.rundir import RunDir

    meta = json.loads((tiny_bundle / "model.json").read_text())
    records = [fold_dir.record() for fold_dir in RunDir(tiny_run).arm(TINY_ARM).predicted_folds()]
    assert all(record["model_spec"] == meta["model_spec"] for record in records)
    spec = meta["model_spec"]
    assert meta["format_version"] == 2
    assert meta["model"] == {"registry_name": spec["registry_name"], "create_kwargs": spec["create_kwargs"]}
    assert meta["model"] == {"registry_name": "lite0_plain",
                             "create_kwargs": {"num_classes": 4, "in_chans": 1, "views": "dual",
                                               "fusion": "mean_logits"}}
    assert meta["class_names"] == spec["class_names"]
    assert meta["preprocess"]["params"] == spec["preprocess"] == PreprocessParams.build(32, "mammo", {}).to_dict()
    assert meta["preprocess"]["fingerprint"] == spec["preprocess_fingerprint"]
    assert meta["preprocess"]["version"] == spec["preprocess_version"] == PREPROCESS_VERSION
    assert meta["input"]["shape"] == [2, 1, 32, 32] and meta["input"]["image_size"] == 32
    bundle = load_unsigned(tiny_bundle)
    assert bundle.spec.to_dict() == spec
    assert [entry["fold"] for entry in meta["weights"]] == [0, 1, 2]


@slow
def test_the_card_records_data_metrics_transfer_and_provenance(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text())
    data = card["training_data"]
    assert data["dataset_adapter"] == "cmmd" and data["task"]["name"] == "synth_subtype4"
    assert data["task"]["label_column"] in data["label_definition"]
    assert sum(counts["breasts"] for counts in data["per_class"].values()) == data["breasts"]
    metrics = {row["metric"]: row for row in card["cv_metrics"]["metrics"]}
    assert {"accuracy", "macro_auc"} <= set(metrics)
    assert any("(HER2-enriched)" in name for name in metrics)  # per class
    for row in metrics.values():
        if row["pooled"] is not None and row["ci_low"] is not None:
            assert row["ci_low"] <= row["pooled"] + 1e-9 and row["pooled"] <= row["ci_high"] + 1e-9
    assert [link["fold"] for link in card["transfer_chain"]] == [0, 1, 2]
    assert all(link["imagenet"] == "not used" and link["stage1_sha256"] is None for link in card["transfer_chain"])
    assert card["stage1"] is None
    assert card["provenance"]["run_environment"]["git_commit"]
    assert "torch" in card["provenance"]["bundled_with"]
    markdown = (tiny_bundle / "card.md").read_text()
    assert "research use only" in markdown and "macro_auc" in markdown and "Temperature" in markdown


@slow
def test_a_synthetic_bundle_says_so_in_its_card_and_the_first_lines_of_card_md(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text())
    data = card["training_data"]
    assert data["synthetic"] is True and "synth_info.json" in data["synthetic_because"]
    assert "synthetic images" in data["validated_on"] and "never validated on patients" in data["validated_on"]
    first_lines = "\n".join((tiny_bundle / "card.md").read_text().splitlines()[:6])
    assert "SYNTHETIC" in first_lines and "not on patients" in first_lines
    assert data["validated_on"] in first_lines
    bundle = load_unsigned(tiny_bundle)
    assert bundle.synthetic is True


@slow
def test_no_pickles_every_file_is_listed_and_the_signature_covers_them(tiny_bundle, tiny_run):
    from safetensors.torch import load_file

    from tlese.bundle.format import load_bundle
    from tlese.train.trained import load_trained

    files = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    assert not [name for name in files if name.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert {Path(name).suffix for name in files} <= {".json", ".md", ".sha256", ".safetensors", ".npy", ".onnx"}
    weights = [name for name in files if name.startswith("weights/")]
    assert weights == [f"weights/fold_{k}.safetensors" for k in range(3)]
    for fold, name in enumerate(weights):  # the very tensors the fold predicted with
        state = load_file(tiny_bundle / name)
        trained = load_trained(tiny_run, TINY_ARM, fold).model.state_dict()
        assert state.keys() == trained.keys()
        assert all(np.array_equal(state[key].numpy(), trained[key].numpy()) for key in state)
    listed = [line.split("  ", 1)[1] for line in (tiny_bundle / "checksums.sha256").read_text().splitlines()]
    assert sorted(listed) == [name for name in files if name not in ("checksums.sha256", "signature.json")]
    if shutil.which("sha256sum"):  # the format the tool itself reads
        subprocess.run(["sha256sum", "--check", "--quiet", "checksums.sha256"], cwd=tiny_bundle, check=True)
    # conftest signs it with the session's key, the one key $TLESE_TRUSTED_KEYS trusts: it loads as signed.
    signature = json.loads((tiny_bundle / "signature.json").read_text())
    assert signature["signed_file"] == "checksums.sha256" and load_bundle(tiny_bundle).signed


@slow
def test_the_bundle_carries_one_checked_onnx_file_per_fold(tiny_bundle):
    from tlese.bundle.format import TOLERANCE
    from tlese.bundle.onnx import OnnxModel

    meta = json.loads((tiny_bundle / "model.json").read_text())
    entries = meta["onnx"]
    assert [entry["fold"] for entry in entries] == [0, 1, 2]
    bundle = load_unsigned(tiny_bundle)
    x = np.random.default_rng(11).random((4, 2, 1, 32, 32), dtype=np.float32)
    torch_outputs = bundle.predict_arrays(x)
    for index, entry in enumerate(entries):
        assert entry["file"] == f"onnx/fold_{entry['fold']}.onnx" and 0 <= entry["max_abs_diff"] <= TOLERANCE
        logits = OnnxModel(tiny_bundle / entry["file"], threads=1)(x).astype(np.float64)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        assert np.abs(probabilities - torch_outputs["per_model"][index]).max() <= TOLERANCE  # inputs never seen


@slow
def test_calibration_is_cross_fitted_for_the_ensemble_and_applied_only_when_it_helps(tiny_bundle, tiny_run):
    from tlese.bundle.calibration import fit_ensemble_calibration
    from tlese.train.runs import FinishedRun

    run = FinishedRun(tiny_run)
    oof = run.predictions(TINY_ARM).predictions
    card = json.loads((tiny_bundle / "card.json").read_text())["calibration"]
    meta = json.loads((tiny_bundle / "model.json").read_text())["calibration"]
    assert not oof.duplicated(["patient_id", "side"]).any()  # each breast once, by the one model that held it out
    classes = json.loads((tiny_bundle / "model.json").read_text())["class_names"]
    expected = fit_ensemble_calibration(oof[[f"prob_{name}" for name in classes]].to_numpy(),
                                        oof["target"].to_numpy(), oof["fold"].to_numpy(),
                                        oof["patient_id"].astype(str).to_numpy(), seed=0)
    assert card["temperature"] == pytest.approx(expected["temperature"], rel=1e-9)
    assert card["applied"] == expected["applied"] == meta["applied"]
    assert card["n"] == len(oof) and card["checked_on"] and card["reason"]
    assert meta["temperature"] == card["temperature"] and meta["method"] == "temperature"
    bundle = load_unsigned(tiny_bundle)
    assert bundle.temperature == (card["temperature"] if card["applied"] else 1.0)
    markdown = (tiny_bundle / "card.md").read_text()
    assert ("NOT applied" in markdown) is (not card["applied"]) and card["reason"] in markdown


@slow
def test_the_ood_model_is_fitted_on_the_training_images_features(tiny_bundle, tiny_run):
    from tlese.train.release import fit_bundle_ood, training_features
    from tlese.train.runs import FinishedRun

    meta = json.loads((tiny_bundle / "model.json").read_text())
    card = json.loads((tiny_bundle / "card.json").read_text())["ood"]
    bundle = load_unsigned(tiny_bundle)
    run = FinishedRun(tiny_run)
    refit, refit_card = fit_bundle_ood(run.experiment, bundle.spec, bundle.models, seed=0)
    features, unit = training_features(run.experiment, bundle.spec, bundle.models)
    assert unit == "breast" and len(features) == card["n_fitted_on"]
    if not card["fitted"]:  # a collapsed 1-epoch model: no OOD model, and the card says why
        assert refit is None and refit_card == card and "ood" not in meta and bundle.ood is None
        assert card["reason"].startswith("features degenerate")
        assert "No OOD check: features degenerate" in (tiny_bundle / "card.md").read_text()
        return
    entry = meta["ood"]
    assert entry["file"] == "ood.safetensors" and (tiny_bundle / entry["file"]).is_file()
    assert 0.0 <= entry["false_flag_rate"] <= 1.0 and card["false_flag_rate"] == entry["false_flag_rate"]
    assert refit.threshold == pytest.approx(entry["threshold"], rel=1e-9)  # the same images give the same model
    assert refit.meta()["false_flag_rate"] == entry["false_flag_rate"]
    assert np.allclose(bundle.ood.score(features), refit.score(features))
    outputs = bundle.predict_arrays(np.random.default_rng(3).random((2, 2, 1, 32, 32), dtype=np.float32))
    assert outputs["ood_score"].shape == (2,) and outputs["ood_flag"].dtype == bool
    assert "Out-of-distribution" in (tiny_bundle / "card.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Bundles of copies of the tiny run


@slow
def test_the_bundle_keeps_the_trained_preprocessing_when_the_config_is_edited_after_training(tiny_run, tiny_bundle,
                                                                                              tmp_path):
    from tlese.data.preprocess import PreprocessParams
    from tlese.train.release import make_bundle

    run = _copy_run(tiny_run, tmp_path)
    config_file = run / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["image_size"] = 48
    config["preprocess"] = {**(config.get("preprocess") or {}), "high_pct": 98.0, "keep_aspect": False}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    bundle = load_unsigned(make_bundle(run, TINY_ARM, tmp_path / "bundle", onnx=False))
    trained = PreprocessParams.build(32, "mammo", {})
    assert bundle.preprocess == trained and bundle.image_size == 32 and bundle.input_shape == (2, 1, 32, 32)
    meta = bundle.meta
    assert meta["preprocess"]["params"]["high_pct"] == 99.5 and meta["preprocess"]["params"]["keep_aspect"] is True
    assert meta["preprocess"]["fingerprint"] == trained.fingerprint()
    assert meta["model_spec"]["preprocess"] == trained.to_dict()
    # The OOD model saw the images as the folds trained on them (32 px, the trained window), not the edited YAML's.
    untouched = json.loads((tiny_bundle / "card.json").read_text())["ood"]
    assert bundle.card["ood"] == untouched
    assert bundle.predict_arrays(np.full((1, 2, 1, 32, 32), 0.5, dtype=np.float32))["raw"].shape == (1, 4)


@slow
def test_folds_that_trained_different_models_are_refused_naming_them(tiny_run, tmp_path):
    from tlese.bundle.format import BundleError
    from tlese.train.release import make_bundle

    run = _copy_run(tiny_run, tmp_path)

    def other_window(record):
        record["model_spec"]["preprocess"]["high_pct"] = 98.0

    edit_json(run / TINY_ARM / "fold_2" / "fold_info.json", other_window)
    with pytest.raises(BundleError, match=r"folds \[0, 1\] vs folds \[2\]: preprocess\.high_pct: 99\.5 -> 98\.0"):
        make_bundle(run, TINY_ARM, tmp_path / "mixed", onnx=False)
    assert not (tmp_path / "mixed").exists()

    edit_json(run / TINY_ARM / "fold_2" / "fold_info.json", lambda record: record.pop("model_spec"))
    with pytest.raises(ValueError, match=r"fold_2/fold_info\.json: made before fold records carried the model spec"):
        make_bundle(run, TINY_ARM, tmp_path / "old", onnx=False)


@slow
def test_the_command_signs_on_request_and_says_how_to_when_not(tiny_run, tmp_path, capsys, monkeypatch):
    from tlese.bundle.format import BundleError, load_bundle
    from tlese.bundle.signing import TRUSTED_KEYS_ENV, generate_keypair
    from tlese.cli import main

    private, public = generate_keypair(tmp_path / "keys")
    nobody = tmp_path / "no_trusted_keys"
    nobody.mkdir()
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(nobody))
    assert main(["bundle", str(tiny_run), "--arm", TINY_ARM, "--out", str(tmp_path / "b"), "--zip", "--no-onnx",
                 "--sign", str(private), "--intended-use", "research use only (test)"]) == 0
    printed = capsys.readouterr().out
    archive = tmp_path / "b.zip"
    assert f"bundle: {archive}" in printed and f"signed with {private}" in printed and str(public) in printed
    assert "SYNTHETIC" in printed and "validated on:" in printed
    assert not (tmp_path / "b").exists()
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        assert "model.json" in names and "signature.json" in names
        assert all(not n.startswith(("/", "..")) for n in names) and not any(n.endswith(".onnx") for n in names)
    zipped = load_bundle(archive, trusted_keys=public)
    assert zipped.signed and zipped.card["intended_use"] == "research use only (test)"
    with pytest.raises(BundleError):  # the site does not trust the key yet
        load_bundle(archive)

    assert main(["bundle", str(tiny_run), "--arm", TINY_ARM, "--out", str(tmp_path / "u"), "--no-onnx"]) == 0
    printed = capsys.readouterr().out
    assert "UNSIGNED" in printed and "--sign" in printed and "tlese keygen" in printed
    assert not (tmp_path / "u" / "signature.json").exists()
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "u", trusted_keys=public)
    unsigned = load_bundle(tmp_path / "u", allow_unsigned=True)
    assert not unsigned.signed and unsigned.signature_status
    x = np.random.default_rng(7).random((3, 2, 1, 32, 32), dtype=np.float32)
    a, b = zipped.predict_arrays(x), unsigned.predict_arrays(x)
    assert set(a) == set(b)  # "ood_score" only when the run's features allowed an OOD model (not the tiny run's)
    assert all(np.array_equal(a[key], b[key]) for key in a)

    # A bundle is never overwritten; a key that is not there is refused before any work.
    assert main(["bundle", str(tiny_run), "--arm", TINY_ARM, "--out", str(tmp_path / "b"), "--zip"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["bundle", str(tiny_run), "--arm", TINY_ARM, "--out", str(tmp_path / "c"),
                 "--sign", str(tmp_path / "missing.pem")]) == 2
    assert "missing.pem: no private key there" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@slow
def test_only_finished_folds_are_bundled_and_none_is_refused(tiny_run, tmp_path):
    from tlese.bundle.format import BundleError
    from tlese.train.release import make_bundle
    from tlese.train.rundir import RunDir

    run = RunDir(_copy_run(tiny_run, tmp_path))
    run.arm(TINY_ARM).fold(2).record_file.unlink()  # fold 2 "not finished"
    bundle = load_unsigned(make_bundle(run.path, TINY_ARM, tmp_path / "two", onnx=False))
    assert bundle.folds == [0, 1] and len(bundle.models) == 2
    assert bundle.card["folds_missing"] == [2]
    assert "folds [0, 1]" in bundle.card["calibration"]["fitted_on"]
    for fold_dir in run.arm(TINY_ARM).predicted_folds():
        fold_dir.record_file.unlink()
    with pytest.raises(BundleError, match="no finished fold"):
        make_bundle(run.path, TINY_ARM, tmp_path / "none")
    assert not (tmp_path / "none").exists()
