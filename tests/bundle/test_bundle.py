"""Loading a bundle (tlese.bundle.format.load_bundle): it verifies itself and refuses tampering; format 2 carries the
model spec (checked against the other records), class names checked against the task, calibration as recorded,
ONNX files checked by checksum and parity; format-1 bundles still load. Signatures: tests/bundle/test_signing.py;
the maker: tests/train/test_release.py; calibration: tests/bundle/test_calibration.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from exam_helpers import edit_json, load_unsigned

slow = pytest.mark.slow
TINY_ARM = "plain_scratch"  # the arm of tests/conftest.py's tiny_run



def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))



@slow
def test_round_trip(tiny_bundle):
    import tlese
    import tlese.bundle
    from tlese.bundle.calibration import calibrated_ensemble
    from tlese.bundle.format import load_bundle
    from tlese.data.preprocess import PreprocessParams
    from tlese.data.tasks import get_task

    assert tlese.bundle.load_bundle is load_bundle is tlese.load_bundle
    bundle = load_unsigned(tiny_bundle)
    meta = json.loads((tiny_bundle / "model.json").read_text())
    assert meta["format_version"] == 2
    assert bundle.path == tiny_bundle
    assert bundle.sha256 == hashlib.sha256((tiny_bundle / "checksums.sha256").read_bytes()).hexdigest()
    assert bundle.class_names == list(get_task("synth_subtype4").classes) == list(bundle.task.classes)
    assert (bundle.views, bundle.image_size, bundle.folds) == ("dual", 32, [0, 1, 2])
    assert bundle.preprocess == PreprocessParams.build(32, "mammo", {})
    # The model spec: what the folds recorded, the same as the v1 keys.
    spec = bundle.spec
    assert spec.to_dict() == meta["model_spec"] and bundle.model_name == spec.registry_name == "lite0_plain"
    assert spec.class_names == bundle.class_names and spec.input_shape == bundle.input_shape == (2, 1, 32, 32)
    assert PreprocessParams.from_dict(spec.preprocess) == bundle.preprocess
    assert bundle.synthetic is True and "synthetic" in bundle.validated_on
    assert len(bundle.models) == 3 and not any(model.training for model in bundle.models)
    assert all(p.device.type == "cpu" for model in bundle.models for p in model.parameters())
    calibration = meta["calibration"]
    assert bundle.temperature == (calibration["temperature"] if calibration["applied"] else 1.0)
    assert bundle.card["intended_use"] == "research use only; not for diagnostic use"

    x = np.random.default_rng(5).random((5, 2, 1, 32, 32), dtype=np.float32)
    out = bundle.predict_arrays(x)
    assert out["raw"].shape == out["calibrated"].shape == (5, 4)
    assert out["per_model"].shape == (3, 5, 4) and out["disagreement"].shape == (5,)
    for key in ("raw", "calibrated"):
        assert np.allclose(out[key].sum(axis=1), 1.0)
    assert np.allclose(out["per_model"].sum(axis=2), 1.0)
    assert np.allclose(out["raw"], out["per_model"].mean(axis=0))
    assert np.allclose(out["disagreement"], out["per_model"].std(axis=0).max(axis=1))
    assert np.allclose(out["calibrated"], calibrated_ensemble(out["per_model"], calibration))
    if bundle.ood is not None:
        assert out["ood_score"].shape == out["ood_flag"].shape == (5,) and out["ood_flag"].dtype == bool
        assert np.array_equal(out["ood_flag"], out["ood_score"] > bundle.ood.threshold)
    # In batches or one by one, the same numbers.
    single = bundle.predict_arrays(x[2:3])
    assert np.allclose(single["per_model"][:, 0], out["per_model"][:, 2], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 2, 1, 32, 32\)"):
        bundle.predict_arrays(x[:, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bundle.predict_arrays(x * 255)


@slow
def test_a_tampered_weight_file_is_refused_naming_it(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError

    copy = _copy(tiny_bundle, tmp_path)
    target = copy / "weights" / "fold_1.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights/fold_1\.safetensors differs from its checksum"):
        load_unsigned(copy)
    (copy / "notes.txt").write_text("an extra file")
    with pytest.raises(BundleError, match=r"not in checksums\.sha256: \['notes\.txt'\]"):
        load_unsigned(copy)


@slow
def test_an_edited_preprocessing_parameter_is_refused(tiny_bundle, tmp_path, monkeypatch):
    from tlese.bundle.format import BundleError, write_checksums

    copy = _copy(tiny_bundle, tmp_path)

    def widen(meta):
        meta["preprocess"]["params"]["high_pct"] = 99.0

    edit_json(copy / "model.json", widen)
    with pytest.raises(BundleError, match=r"model\.json differs from its checksum"):
        load_unsigned(copy)
    write_checksums(copy)  # checksums made consistent again: the fingerprint still tells
    with pytest.raises(BundleError, match="do not match their recorded fingerprint"):
        load_unsigned(copy)

    import tlese.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "PREPROCESS_VERSION", preprocess.PREPROCESS_VERSION + 1)
    with pytest.raises(BundleError, match="preprocessing version 1; the installed tlese has version 2"):
        load_unsigned(tiny_bundle)


@slow
def test_an_edit_with_a_recomputed_fingerprint_still_contradicts_the_model_spec(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError, write_checksums
    from tlese.data.preprocess import PreprocessParams

    copy = _copy(tiny_bundle, tmp_path)

    def widen(meta):  # the fingerprint recomputed: only the model spec (what the folds trained with) tells
        meta["preprocess"]["params"]["high_pct"] = 99.0
        meta["preprocess"]["fingerprint"] = PreprocessParams.from_dict(meta["preprocess"]["params"]).fingerprint()

    edit_json(copy / "model.json", widen)
    write_checksums(copy)
    with pytest.raises(BundleError, match=r"model_spec contradicts .*preprocessing fingerprint '[0-9a-f]+' in "
                                          r"model_spec"):
        load_unsigned(copy)

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "kwargs"))
    edit_json(copy / "model.json", lambda meta: meta["model"]["create_kwargs"].update(fusion="concat"))
    write_checksums(copy)
    with pytest.raises(BundleError, match="model_spec contradicts .*create kwargs"):
        load_unsigned(copy)


@slow
def test_class_names_that_are_not_the_tasks_are_refused_naming_both(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError, write_checksums

    copy = _copy(tiny_bundle, tmp_path)
    meta = json.loads((copy / "model.json").read_text())
    task_classes = list(meta["task"]["classes"])
    swapped = [task_classes[1], task_classes[0], *task_classes[2:]]

    def swap(value):  # class names and the spec agree with each other, not with the task the bundle carries
        value["class_names"] = value["model_spec"]["class_names"] = swapped

    edit_json(copy / "model.json", swap)
    write_checksums(copy)
    with pytest.raises(BundleError) as refused:
        load_unsigned(copy)
    assert str(swapped) in str(refused.value) and str(task_classes) in str(refused.value)
    assert "class_names" in str(refused.value) and "task" in str(refused.value)


@slow
def test_outputs_that_drift_from_the_reference_are_refused(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError, write_checksums

    copy = _copy(tiny_bundle, tmp_path)

    def drift(expected):
        expected["references"][1]["raw"][0] += 1e-3

    edit_json(copy / "reference" / "expected.json", drift)
    write_checksums(copy)
    with pytest.raises(BundleError, match=r"reference reference/ref_1\.npy: raw probabilities differ .* by up to "
                                          r"0\.001"):
        load_unsigned(copy)


@slow
def test_calibration_not_applied_means_t_1_and_format_1_bundles_apply_it_to_the_mean(tiny_bundle, tmp_path):
    from tlese.bundle.calibration import apply_temperature
    from tlese.bundle.format import write_checksums

    copy = _copy(tiny_bundle, tmp_path)
    edit_json(copy / "model.json", lambda meta: meta["calibration"].update(temperature=2.5, applied=False))
    write_checksums(copy)
    bundle = load_unsigned(copy)  # the references still hold: T is not applied
    out = bundle.predict_arrays(np.random.default_rng(1).random((3, 2, 1, 32, 32), dtype=np.float32))
    assert bundle.temperature == 1.0 and np.array_equal(out["calibrated"], out["raw"])

    def legacy(meta):  # a format-1 record: no "applied", T on the ensemble mean
        meta["calibration"] = {"method": "temperature", "temperature": 2.5,
                               "applied_to": "ensemble-mean probability"}

    edit_json(copy / "model.json", legacy)
    write_checksums(copy)
    bundle = load_unsigned(copy, check_references=False)
    out = bundle.predict_arrays(np.random.default_rng(1).random((3, 2, 1, 32, 32), dtype=np.float32))
    assert bundle.temperature == 2.5 and np.allclose(out["calibrated"], apply_temperature(out["raw"], 2.5))


def _as_format_1(folder: Path) -> None:
    """Rewrite a bundle as format 1 wrote it: no model spec, ONNX, OOD model or applied flag; card without the
    synthetic flag."""
    from tlese.bundle.format import write_checksums

    def downgrade(meta):
        meta["format_version"] = 1
        for key in ("model_spec", "onnx", "ood"):
            meta.pop(key, None)
        meta["calibration"] = {"method": "temperature", "temperature": 1.0, "applied_to": "ensemble-mean probability"}

    edit_json(folder / "model.json", downgrade)

    def card(value):
        value["training_data"].pop("synthetic", None)
        value["training_data"].pop("validated_on", None)

    edit_json(folder / "card.json", card)
    (folder / "ood.safetensors").unlink(missing_ok=True)
    shutil.rmtree(folder / "onnx", ignore_errors=True)
    (folder / "signature.json").unlink(missing_ok=True)

    def expected(value):  # format 1 recorded no OOD score
        for reference in value["references"]:
            reference.pop("ood_score", None)

    edit_json(folder / "reference" / "expected.json", expected)
    write_checksums(folder)


@slow
def test_a_format_1_bundle_still_loads_with_its_spec_built_from_the_v1_keys(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError, write_checksums

    v2 = load_unsigned(tiny_bundle)
    copy = _copy(tiny_bundle, tmp_path)
    _as_format_1(copy)
    v1 = load_unsigned(copy)
    assert v1.meta["format_version"] == 1 and v1.spec == v2.spec
    assert v1.ood is None and v1.onnx == [] and v1.onnx_predictor() is None
    assert v1.synthetic  # a registered synthetic task (synth_*) says so when the card does not
    assert "not recorded" in v1.validated_on
    x = np.random.default_rng(2).random((2, 2, 1, 32, 32), dtype=np.float32)
    assert np.allclose(v1.predict_arrays(x)["per_model"], v2.predict_arrays(x)["per_model"])
    edit_json(copy / "model.json", lambda meta: meta.update(format_version=2))
    write_checksums(copy)
    with pytest.raises(BundleError, match=r"format 2\) has no model_spec"):
        load_unsigned(copy)


@slow
def test_the_bundles_onnx_files_give_the_same_outputs_and_are_checked(tiny_bundle, tmp_path):
    from tlese.bundle.format import TOLERANCE, BundleError, write_checksums

    bundle = load_unsigned(tiny_bundle)
    assert [entry["fold"] for entry in bundle.onnx] == bundle.folds
    predictor = bundle.onnx_predictor(threads=1)
    x = np.random.default_rng(3).random((5, 2, 1, 32, 32), dtype=np.float32)
    want, got = bundle.predict_arrays(x), predictor(x)
    assert set(got) == set(want)
    for key in ("per_model", "raw", "calibrated", "disagreement"):
        assert np.abs(got[key] - want[key]).max() <= TOLERANCE
    if bundle.ood is not None:  # OOD features from the graphs' second output
        assert got["ood_flag"].dtype == bool and got["ood_score"].shape == (5,)
        assert np.array_equal(got["ood_flag"], got["ood_score"] > bundle.ood.threshold)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor(x * 255)

    # A damaged ONNX file is refused at load, like any file.
    copy = _copy(tiny_bundle, tmp_path)
    target = copy / "onnx" / "fold_2.onnx"
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match=r"onnx/fold_2\.onnx differs from its checksum"):
        load_unsigned(copy)
    # Another fold's model in its place (checksums and records updated): the parity check under ONNX Runtime tells.
    shutil.copy(copy / "onnx" / "fold_0.onnx", target)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    edit_json(copy / "model.json", lambda meta: meta["onnx"][2].update(sha256=sha))
    write_checksums(copy)
    swapped = load_unsigned(copy)
    with pytest.raises(BundleError, match=r"under ONNX Runtime: per_model probabilities differ"):
        swapped.onnx_predictor(threads=1)
    # A recorded parity beyond the tolerance is refused.
    edit_json(copy / "model.json", lambda meta: meta["onnx"][0].update(max_abs_diff=1e-3))
    write_checksums(copy)
    with pytest.raises(BundleError, match=r"onnx/fold_0\.onnx: recorded parity 0\.001 is not within 0\.0001"):
        load_unsigned(copy)


@slow
def test_a_zip_loads_the_same_and_a_damaged_member_is_refused(tiny_bundle, tmp_path):
    from tlese.bundle.format import BundleError

    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        for path in sorted(p for p in tiny_bundle.rglob("*") if p.is_file()):
            opened.write(path, path.relative_to(tiny_bundle).as_posix())
    zipped, folder = load_unsigned(archive), load_unsigned(tiny_bundle)
    assert zipped.folds == folder.folds and zipped.temperature == pytest.approx(folder.temperature)
    assert zipped.spec == folder.spec and zipped.sha256 == folder.sha256
    x = np.random.default_rng(7).random((3, 2, 1, 32, 32), dtype=np.float32)
    a, b = zipped.predict_arrays(x), folder.predict_arrays(x)
    assert all(np.array_equal(a[key], b[key]) for key in ("raw", "per_model", "calibrated"))
    assert np.allclose(zipped.onnx_predictor(threads=1)(x)["raw"], b["raw"], atol=1e-4)  # ONNX read from the zip
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data.replace(b"Luminal A", b"Luminal Z") if name == "card.json" else data)
    with pytest.raises(BundleError, match=r"card\.json differs from its checksum"):
        load_unsigned(damaged)
