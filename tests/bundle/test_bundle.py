"""The bundle: a finished run frozen into safetensors + records that load offline, verify themselves and refuse
tampering; temperature scaling fitted on out-of-fold predictions only."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tlese.bundle.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)

# ---------------------------------------------------------------------------------------------------------------
# Calibration (no training run needed)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _synthetic(n: int = 4000, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from them: softmax(z) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, k))
    p = _softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, y


def test_overconfident_probabilities_get_a_temperature_above_one_and_a_lower_ece():
    z, y = _synthetic()
    overconfident = _softmax(3.0 * z)  # logits scaled by 3: the right temperature is 3
    temperature = fit_temperature(overconfident, y)
    assert temperature > 1 and abs(temperature - 3.0) < 0.3
    scaled = apply_temperature(overconfident, temperature)
    before, after = expected_calibration_error(overconfident, y), expected_calibration_error(scaled, y)
    assert after < before / 3
    assert negative_log_likelihood(scaled, y) < negative_log_likelihood(overconfident, y)


def test_calibrated_probabilities_keep_a_temperature_near_one_and_underconfident_ones_get_below_one():
    z, y = _synthetic(seed=1)
    assert abs(fit_temperature(_softmax(z), y) - 1.0) < 0.1
    assert fit_temperature(_softmax(0.5 * z), y) < 0.7


def test_apply_temperature():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert np.allclose(apply_temperature(p, 1.0), p)
    softened = apply_temperature(p, 2.0)
    assert np.allclose(softened.sum(axis=1), 1.0)
    assert (softened.max(axis=1) < p.max(axis=1)).all()
    assert (softened.argmax(axis=1) == p.argmax(axis=1)).all()
    assert np.allclose(softened[0], np.sqrt(p[0]) / np.sqrt(p[0]).sum())  # softmax(log p / 2) = sqrt(p), renormalised
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(p, bad)


def test_expected_calibration_error_known_answer():
    # Confidence 0.9 and right, 0.65 and wrong: two bins, each half the data: 0.5 * 0.1 + 0.5 * 0.65.
    probs = np.array([[0.9, 0.1], [0.65, 0.35]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.375)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)
    # Both in one bin (15 bins over [0, 1]: (0.6, 0.667]): |accuracy 0.5 - mean confidence 0.63|.
    same_bin = np.array([[0.62, 0.38], [0.64, 0.36]])
    assert expected_calibration_error(same_bin, np.array([0, 1])) == pytest.approx(0.13)
    with pytest.raises(ValueError, match="targets"):
        expected_calibration_error(probs, np.array([0, 2]))


# ---------------------------------------------------------------------------------------------------------------
# Bundles of a tiny finished run (tests/serve/conftest.py)

slow = pytest.mark.slow
TINY_ARM = "plain_scratch"  # the arm of conftest's tiny_run


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


@slow
def test_round_trip(tiny_bundle, tiny_run):
    import tlese
    import tlese.bundle
    from tlese.bundle.format import load_bundle
    from tlese.data.preprocess import PreprocessParams
    from tlese.data.tasks import get_task

    assert tlese.bundle.load_bundle is load_bundle is tlese.load_bundle
    bundle = load_bundle(tiny_bundle)
    assert bundle.path == tiny_bundle
    assert bundle.sha256 == hashlib.sha256((tiny_bundle / "checksums.sha256").read_bytes()).hexdigest()
    assert bundle.class_names == list(get_task("synth_subtype4").classes)
    assert (bundle.views, bundle.image_size, bundle.folds) == ("dual", 32, [0, 1, 2])
    assert bundle.preprocess == PreprocessParams.build(32, "mammo", {})
    assert len(bundle.models) == 3 and not any(model.training for model in bundle.models)
    assert all(p.device.type == "cpu" for model in bundle.models for p in model.parameters())
    assert bundle.temperature == bundle.card["calibration"]["temperature"] > 0
    assert bundle.card["intended_use"] == "research use only; not for diagnostic use"
    assert bundle.card["folds_included"] == [0, 1, 2] and bundle.card["folds_missing"] == []

    x = np.random.default_rng(5).random((5, 2, 1, 32, 32), dtype=np.float32)
    out = bundle.predict_arrays(x)
    assert out["raw"].shape == out["calibrated"].shape == (5, 4)
    assert out["per_model"].shape == (3, 5, 4) and out["disagreement"].shape == (5,)
    for key in ("raw", "calibrated"):
        assert np.allclose(out[key].sum(axis=1), 1.0)
    assert np.allclose(out["per_model"].sum(axis=2), 1.0)
    assert np.allclose(out["raw"], out["per_model"].mean(axis=0))
    assert np.allclose(out["disagreement"], out["per_model"].std(axis=0).max(axis=1))
    assert np.allclose(out["calibrated"], apply_temperature(out["raw"], bundle.temperature))
    # In batches or one by one, the same numbers.
    single = bundle.predict_arrays(x[2:3])
    assert np.allclose(single["per_model"][:, 0], out["per_model"][:, 2], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 2, 1, 32, 32\)"):
        bundle.predict_arrays(x[:, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bundle.predict_arrays(x * 255)


@slow
def test_the_card_records_data_metrics_transfer_and_provenance(tiny_bundle, tiny_run):
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
    calibration = card["calibration"]
    for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after"):
        assert isinstance(calibration[key], float)
    assert "ensemble" in calibration["note"] and "approximation" in calibration["note"]
    assert card["provenance"]["run_environment"]["git_commit"]
    assert "torch" in card["provenance"]["bundled_with"]
    markdown = (tiny_bundle / "card.md").read_text()
    assert "research use only" in markdown and "macro_auc" in markdown and "Temperature" in markdown
    meta = json.loads((tiny_bundle / "model.json").read_text())
    assert meta["model"] == {"registry_name": "lite0_plain",
                             "create_kwargs": {"num_classes": 4, "in_chans": 1, "views": "dual",
                                               "fusion": "mean_logits"}}
    assert [entry["fold"] for entry in meta["weights"]] == [0, 1, 2]


@slow
def test_no_pickles_every_weight_file_is_safetensors_and_checksums_cover_every_file(tiny_bundle, tiny_run):
    from safetensors.torch import load_file

    from tlese.train.trained import load_trained

    files = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    assert not [name for name in files if name.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert {Path(name).suffix for name in files} <= {".json", ".md", ".sha256", ".safetensors", ".npy"}
    weights = [name for name in files if name.endswith(".safetensors")]
    assert weights == [f"weights/fold_{k}.safetensors" for k in range(3)]
    for fold, name in enumerate(weights):  # the very tensors the fold predicted with
        state = load_file(tiny_bundle / name)
        trained = load_trained(tiny_run, TINY_ARM, fold).model.state_dict()
        assert state.keys() == trained.keys()
        assert all(np.array_equal(state[key].numpy(), trained[key].numpy()) for key in state)
    for name in files:
        if name.endswith(".npy"):
            np.load(tiny_bundle / name, allow_pickle=False)
    listed = [line.split("  ", 1)[1] for line in (tiny_bundle / "checksums.sha256").read_text().splitlines()]
    assert sorted(listed) == [name for name in files if name != "checksums.sha256"]
    if shutil.which("sha256sum"):  # the format the tool itself reads
        subprocess.run(["sha256sum", "--check", "--quiet", "checksums.sha256"], cwd=tiny_bundle, check=True)


@slow
def test_a_tampered_weight_file_is_refused_naming_it(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError, load_bundle

    copy = _copy(tiny_bundle, tmp_path)
    target = copy / "weights" / "fold_1.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights/fold_1\.safetensors differs from its checksum"):
        load_bundle(copy)
    (copy / "notes.txt").write_text("an extra file")
    with pytest.raises(BundleError, match=r"not in checksums\.sha256: \['notes\.txt'\]"):
        load_bundle(copy)


@slow
def test_an_edited_preprocessing_parameter_is_refused(tiny_bundle, tmp_path, monkeypatch):
    from tlese.bundle.format import BundleError, load_bundle, write_checksums

    copy = _copy(tiny_bundle, tmp_path)

    def widen(meta):
        meta["preprocess"]["params"]["high_pct"] = 99.0

    _edit_json(copy / "model.json", widen)
    with pytest.raises(BundleError, match=r"model\.json differs from its checksum"):
        load_bundle(copy)
    write_checksums(copy)  # checksums made consistent again: the fingerprint still tells
    with pytest.raises(BundleError, match="do not match their recorded fingerprint"):
        load_bundle(copy)

    import tlese.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "PREPROCESS_VERSION", preprocess.PREPROCESS_VERSION + 1)
    with pytest.raises(BundleError, match="preprocessing version 1; the installed tlese has version 2"):
        load_bundle(tiny_bundle)


@slow
def test_outputs_that_drift_from_the_reference_are_refused(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError, load_bundle, write_checksums

    copy = _copy(tiny_bundle, tmp_path)

    def drift(expected):
        expected["references"][1]["raw"][0] += 1e-3

    _edit_json(copy / "reference" / "expected.json", drift)
    write_checksums(copy)
    with pytest.raises(BundleError, match=r"reference reference/ref_1\.npy: raw probabilities differ .* by up to "
                                          r"0\.001"):
        load_bundle(copy)


@slow
def test_the_temperature_is_fitted_on_out_of_fold_predictions_only(tiny_bundle, tiny_run):
    import pandas as pd

    from tlese.train.rundir import RunDir

    run = RunDir(tiny_run)
    arm = run.arm(TINY_ARM)
    card = json.loads((tiny_bundle / "card.json").read_text())
    frames = []
    for fold_dir in arm.predicted_folds():
        frame = fold_dir.predictions("breasts")
        split = fold_dir.split()
        trained_on = set(split.loc[split["role"] != "test", "patient_id"])
        assert set(frame["patient_id"]) <= fold_dir.test_patients()
        assert not set(frame["patient_id"]) & trained_on  # no row predicted by a model that trained on it
        assert set(frame["fold"]) == {fold_dir.fold}
        frames.append(frame)
    oof = pd.concat(frames, ignore_index=True)
    summary = pd.read_csv(run.data_summary_file)
    breasts = int(summary.loc[summary["fold"].astype(str) == "all", "breasts"].iloc[0])
    assert len(oof) == breasts == card["calibration"]["n"]
    assert not oof.duplicated(["patient_id", "side"]).any()  # each breast once, by the one model that held it out
    classes = json.loads((tiny_bundle / "model.json").read_text())["class_names"]
    probs = oof[[f"prob_{name}" for name in classes]].to_numpy()
    assert fit_temperature(probs, oof["target"].to_numpy()) == pytest.approx(card["calibration"]["temperature"],
                                                                             rel=1e-9)
    assert expected_calibration_error(probs, oof["target"].to_numpy()) == pytest.approx(
        card["calibration"]["ece_before"])


@slow
def test_the_command_writes_a_zip_that_loads_the_same(tiny_bundle, tiny_run, tmp_path, capsys):
    from tlese.bundle.format import BundleError, load_bundle
    from tlese.cli import main

    assert main(["bundle", str(tiny_run), "--arm", TINY_ARM, "--out", str(tmp_path / "b"), "--zip",
                 "--intended-use", "research use only (test)"]) == 0
    archive = tmp_path / "b.zip"
    assert f"bundle: {archive}" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()
    with zipfile.ZipFile(archive) as opened:
        assert "model.json" in opened.namelist() and all(not n.startswith(("/", "..")) for n in opened.namelist())
    zipped, folder = load_bundle(archive), load_bundle(tiny_bundle)
    assert zipped.card["intended_use"] == "research use only (test)"
    assert zipped.folds == folder.folds and zipped.temperature == pytest.approx(folder.temperature)
    assert [e["sha256"] for e in zipped.meta["weights"]] == [e["sha256"] for e in folder.meta["weights"]]
    x = np.random.default_rng(7).random((3, 2, 1, 32, 32), dtype=np.float32)
    a, b = zipped.predict_arrays(x), folder.predict_arrays(x)
    assert all(np.array_equal(a[key], b[key]) for key in ("raw", "per_model", "calibrated"))
    # A bundle is never overwritten.
    assert main(["bundle", str(tiny_run), "--arm", TINY_ARM, "--out", str(tmp_path / "b"), "--zip"]) == 2
    assert "exists" in capsys.readouterr().err
    # A damaged member of the zip is refused like a damaged file.
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data.replace(b"Luminal A", b"Luminal Z") if name == "card.json" else data)
    with pytest.raises(BundleError, match=r"card\.json differs from its checksum"):
        load_bundle(damaged)


@slow
def test_only_finished_folds_are_bundled_and_none_is_refused(tiny_run, tmp_path):
    from tlese.bundle.format import BundleError, load_bundle
    from tlese.train.release import make_bundle
    from tlese.train.rundir import RunDir

    run = RunDir(shutil.copytree(tiny_run, tmp_path / "run"))
    run.arm(TINY_ARM).fold(2).record_file.unlink()  # fold 2 "not finished"
    bundle = load_bundle(make_bundle(run.path, TINY_ARM, tmp_path / "two"))
    assert bundle.folds == [0, 1] and len(bundle.models) == 2
    assert bundle.card["folds_missing"] == [2]
    assert bundle.card["calibration"]["fitted_on"].endswith("[0, 1]")
    for fold_dir in run.arm(TINY_ARM).predicted_folds():
        fold_dir.record_file.unlink()
    with pytest.raises(BundleError, match="no finished fold"):
        make_bundle(run.path, TINY_ARM, tmp_path / "none")
    assert not (tmp_path / "none").exists()
