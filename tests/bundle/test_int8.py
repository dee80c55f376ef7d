"""int8 bundles (`tlese bundle --int8`, tlese.train.int8): each fold's ONNX file quantised (static QDQ, per-channel)
on its own training images, checked on the out-of-fold images against fp32, offered only when the macro AUC keeps
within INT8_MAX_AUC_CHANGE; the check in model.json and the card either way; `Bundle.onnx_predictor(int8=True)`.

One bundle is made for the module (tiny_run of tests/conftest.py). The tiny run's fold models give near-constant
probabilities, so its out-of-fold AUC turns on float-noise ties (int8 moved no probability by more than ~5e-5 but
the AUC by ~0.05): the module's bundle is made with the threshold opened (1.0) to follow the "passed" path; the
"failed" path is taken with the threshold below zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from exam_helpers import edit_json, load_unsigned

slow = pytest.mark.slow
TINY_ARM = "plain_scratch"  # the arm of tests/conftest.py's tiny_run
# int8 against fp32 probabilities on these inputs: what the loader allows against the recorded int8 outputs
CLOSE_TO_FP32 = 1e-2


@pytest.fixture(scope="module")
def int8_bundle(tiny_run, signing_key, tmp_path_factory) -> Path:
    from tlese.train import int8
    from tlese.train.release import make_bundle

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "INT8_MAX_AUC_CHANGE", 1.0)
        return make_bundle(tiny_run, TINY_ARM, tmp_path_factory.mktemp("int8") / "bundle", sign_key=signing_key,
                           int8=True)


def _unsigned_copy(bundle: Path, target: Path, edit=None, remove_int8: bool = False) -> Path:
    """A copy of `bundle`, model.json edited by `edit`, optionally without its int8 files, re-checksummed."""
    from tlese.bundle.format import write_checksums

    copy = Path(shutil.copytree(bundle, target))
    (copy / "signature.json").unlink(missing_ok=True)
    if remove_int8:
        for path in (copy / "onnx").glob("*.int8.onnx"):
            path.unlink()
        (copy / "reference" / "expected_int8.json").unlink()
    if edit is not None:
        edit_json(copy / "model.json", edit)
    write_checksums(copy)
    return copy


def _tiny_qdq_source(path: Path) -> Path:
    """A small fp32 graph: Conv (4 output channels) -> BatchNormalization -> Relu, input (B, 1, 8, 8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    spread = np.array([1, 10, 0.1, 3], np.float32)[:, None, None, None]  # channels of very different ranges
    weights = {"w": rng.normal(size=(4, 1, 3, 3)).astype(np.float32) * spread,
               "b": rng.normal(size=4).astype(np.float32), "scale": np.array([1, 0.5, 2, 1], np.float32),
               "shift": np.zeros(4, np.float32), "mean": rng.normal(size=4).astype(np.float32),
               "var": np.array([1, 4, 0.25, 1], np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["conv", "scale", "shift", "mean", "var"], ["bn"]),
         helper.make_node("Relu", ["bn"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_quantize_onnx_writes_qdq_with_per_channel_weight_scales_and_folds_batchnorm(tmp_path):
    import onnx
    from onnx import numpy_helper

    from tlese.bundle.onnx import OnnxModel, quantize_onnx

    source = _tiny_qdq_source(tmp_path / "fp32.onnx")
    calibration = [np.random.default_rng(seed).random((4, 1, 8, 8), dtype=np.float32) for seed in range(3)]
    out = quantize_onnx(source, tmp_path / "int8.onnx", iter(calibration))
    again = quantize_onnx(source, tmp_path / "again.onnx", iter(calibration))
    assert out.read_bytes() == again.read_bytes()  # same file and calibration, same bytes
    assert not list(tmp_path.glob("*.pre.onnx"))
    graph = onnx.load(str(out)).graph
    kinds = [node.op_type for node in graph.node]
    assert "QuantizeLinear" in kinds and "DequantizeLinear" in kinds
    assert "BatchNormalization" not in kinds  # folded into the Conv before quantising
    initializers = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    conv = next(node for node in graph.node if node.op_type == "Conv")
    weight_dq = next(node for node in graph.node
                     if node.op_type == "DequantizeLinear" and node.output[0] == conv.input[1])
    assert initializers[weight_dq.input[0]].dtype == np.int8  # weights stored as int8
    scale = initializers[weight_dq.input[1]]
    assert scale.size == 4 and len(set(scale.tolist())) == 4  # one scale per output channel
    x = np.random.default_rng(9).random((2, 1, 8, 8), dtype=np.float32)
    fp32, int8 = OnnxModel(source, threads=1)(x), OnnxModel(out, threads=1)(x)
    assert np.abs(int8 - fp32).max() <= 0.05 * np.abs(fp32).max() and not np.array_equal(int8, fp32)


def test_int8_needs_the_onnx_files(tmp_path, capsys):
    from tlese.bundle.format import BundleError
    from tlese.cli import main
    from tlese.train.release import make_bundle

    with pytest.raises(BundleError, match="cannot be combined with --no-onnx"):
        make_bundle(tmp_path / "no_run", TINY_ARM, tmp_path / "b", onnx=False, int8=True)
    assert main(["bundle", str(tmp_path / "no_run"), "--arm", TINY_ARM, "--out", str(tmp_path / "b"), "--int8",
                 "--no-onnx"]) == 2
    assert "--no-onnx" in capsys.readouterr().err and not (tmp_path / "b").exists()


@slow
def test_the_check_is_recorded_with_the_out_of_fold_numbers(int8_bundle, tiny_run):
    from tlese.train.runs import FinishedRun

    meta = json.loads((int8_bundle / "model.json").read_text())
    card = json.loads((int8_bundle / "card.json").read_text())
    check = meta["int8"]["check"]
    run = FinishedRun(tiny_run)
    oof = run.predictions(TINY_ARM).predictions  # the dual-view run's out-of-fold breasts
    assert check["n_oof"] == len(oof) and check["unit"] == "breast"
    for key in ("macro_auc_fp32", "macro_auc_int8", "macro_auc_change", "macro_auc_recorded", "max_abs_prob_change",
                "mean_abs_prob_change", "predicted_class_changed", "ensemble_max_abs_prob_change"):
        assert math.isfinite(check[key]), key
    assert check["macro_auc_change"] == pytest.approx(check["macro_auc_int8"] - check["macro_auc_fp32"])
    assert 0 <= check["mean_abs_prob_change"] <= check["max_abs_prob_change"] < CLOSE_TO_FP32
    assert check["fp32_vs_recorded_max_abs_diff"] < 1e-4  # the same items, prepared as the folds predicted them
    assert check["passed"] is True and check["threshold"] == 1.0 and "within" in check["reason"]
    assert check["ood_flag_changed"] is None  # the tiny run's features allow no OOD model
    calibration = check["calibration"]
    for fold_dir in run.finished_folds(TINY_ARM):
        split = fold_dir.split()
        train = set(split.loc[split["role"] == "train", "patient_id"])
        n_train = int(oof["patient_id"].isin(train).sum())  # each breast is out-of-fold once: count them there
        assert 0 < calibration["items_per_fold"][str(fold_dir.fold)] == min(64, n_train)
    assert card["int8"] == check
    text = (int8_bundle / "card.md").read_text()
    assert "## int8 (ONNX Runtime)" in text and "Offered" in text and f"on {len(oof)} out-of-fold breasts" in text


@slow
def test_int8_files_are_listed_checksummed_and_close_to_fp32(int8_bundle):
    from tlese.bundle.format import CHECKSUMS_FILE, INT8_TOLERANCE, load_bundle, parse_checksums

    meta = json.loads((int8_bundle / "model.json").read_text())
    listed = parse_checksums((int8_bundle / CHECKSUMS_FILE).read_text(), CHECKSUMS_FILE)
    files = meta["int8"]["files"]
    assert [entry["fold"] for entry in files] == [entry["fold"] for entry in meta["weights"]]
    for entry in files:
        assert entry["file"] == f"onnx/fold_{entry['fold']}.int8.onnx"
        assert listed[entry["file"]] == entry["sha256"] == hashlib.sha256((int8_bundle / entry["file"]).read_bytes()
                                                                          ).hexdigest()
    assert meta["int8"]["reference"] == {"file": "reference/expected_int8.json", "tolerance": INT8_TOLERANCE}
    assert "reference/expected_int8.json" in listed

    bundle = load_bundle(int8_bundle)  # signed with the session's trusted key
    assert bundle.int8_check == meta["int8"]["check"] and len(bundle.int8) == len(bundle.folds)
    fp32, int8 = bundle.onnx_predictor(threads=1), bundle.onnx_predictor(threads=1, int8=True)
    x = np.random.default_rng(4).random((6, 2, 1, 32, 32), dtype=np.float32)
    a, b = fp32(x), int8(x)
    assert set(a) == set(b)
    for key in ("per_model", "raw", "calibrated"):
        assert np.abs(a[key] - b[key]).max() <= CLOSE_TO_FP32, key
    assert not np.array_equal(a["per_model"], b["per_model"])  # really the int8 files


@slow
def test_int8_predictor_says_why_there_are_no_int8_files(int8_bundle, tmp_path):
    from tlese.bundle.format import BundleError, write_checksums

    plain = load_unsigned(_unsigned_copy(int8_bundle, tmp_path / "plain", edit=lambda meta: meta.pop("int8"),
                                         remove_int8=True))
    assert plain.int8_check is None and plain.int8 == []
    with pytest.raises(BundleError, match=r"no int8 ONNX files: it was made without --int8"):
        plain.onnx_predictor(threads=1, int8=True)
    assert plain.onnx_predictor(threads=1) is not None  # fp32 unaffected

    def failed(meta):
        meta["int8"]["check"].update(passed=False, threshold=0.005, reason="macro AUC changed by +0.0524 on 14 "
                                     "out-of-fold breasts (beyond the limit |change| <= 0.005)")
        meta["int8"]["files"] = []
        meta["int8"].pop("reference")

    refused = load_unsigned(_unsigned_copy(int8_bundle, tmp_path / "failed", edit=failed, remove_int8=True))
    with pytest.raises(BundleError, match=r"its int8 check failed when it was made \(macro AUC changed by \+0\.0524"):
        refused.onnx_predictor(threads=1, int8=True)

    # Files listed beside a check that did not pass: an edited record, refused at load.
    edited = _unsigned_copy(int8_bundle, tmp_path / "edited",
                            edit=lambda meta: meta["int8"]["check"].update(passed=False))
    with pytest.raises(BundleError, match="lists int8 files although its int8 check did not pass"):
        load_unsigned(edited)
    emptied = _unsigned_copy(int8_bundle, tmp_path / "emptied", edit=lambda meta: meta["int8"].update(files=[]),
                             remove_int8=True)
    with pytest.raises(BundleError, match="int8 check passed but lists no int8 files"):
        load_unsigned(emptied)

    # Recorded int8 outputs that the files do not reproduce: refused when the int8 predictor is made.
    def shifted(expected):
        expected["references"][1]["raw"] = [p + 0.05 for p in expected["references"][1]["raw"]]

    drifted = _unsigned_copy(int8_bundle, tmp_path / "drifted")
    edit_json(drifted / "reference" / "expected_int8.json", shifted)
    write_checksums(drifted)
    with pytest.raises(BundleError, match=r"ref_1\.npy under ONNX Runtime int8: raw probabilities differ from "
                                          r"reference/expected_int8\.json"):
        load_unsigned(drifted).onnx_predictor(threads=1, int8=True)


@slow
def test_a_failed_check_leaves_no_int8_files_and_says_so(int8_bundle, tiny_run, tmp_path, monkeypatch):
    from tlese.bundle.ood import fit_ood
    from tlese.train import int8
    from tlese.train.release import _int8_lines
    from tlese.train.runs import FinishedRun

    recorded = json.loads((int8_bundle / "model.json").read_text())["int8"]["check"]
    work = _unsigned_copy(int8_bundle, tmp_path / "work", edit=lambda meta: meta.pop("int8"), remove_int8=True)
    draft = load_unsigned(work, check_references=False)
    # An OOD model of the features' width (the tiny run has none), so the OOD flags are compared too.
    width = 2 * len(draft.folds) * draft.models[0].num_features
    draft.ood = fit_ood(np.random.default_rng(0).normal(size=(40, width)), views=2, seed=0)
    run = FinishedRun(tiny_run)
    monkeypatch.setattr(int8, "INT8_MAX_AUC_CHANGE", -1.0)
    record = int8.release_int8(run, TINY_ARM, draft.spec, draft, work, seed=run.experiment.seed)
    check = record["check"]
    assert check["passed"] is False and record["files"] == [] and "reference" not in record
    assert "beyond the limit |change| <= -1" in check["reason"] and check["threshold"] == -1.0
    assert not list((work / "onnx").glob("*.int8.onnx")) and not (work / "reference" / "expected_int8.json").exists()
    assert isinstance(check["ood_flag_changed"], int) and 0 <= check["ood_flag_changed"] <= check["n_oof"]
    # Deterministic given the run: the same numbers as when the module's bundle was made.
    for key in ("macro_auc_fp32", "macro_auc_int8", "max_abs_prob_change", "n_oof", "calibration"):
        assert check[key] == recorded[key], key
    text = "\n".join(_int8_lines(check))
    assert text.startswith("Not offered: macro AUC changed by") and "carries no int8 files" in text
    assert f"OOD flag changed for {check['ood_flag_changed']} of {check['n_oof']}" in text


@slow
def test_the_bundle_command_prints_one_int8_line(int8_bundle, tmp_path, monkeypatch, capsys):
    from tlese.cli import main
    from tlese.train import release

    copy = Path(shutil.copytree(int8_bundle, tmp_path / "made"))
    monkeypatch.setattr(release, "make_bundle", lambda *args, **kwargs: copy)  # what `tlese bundle --int8` made
    assert main(["bundle", "run", "--arm", TINY_ARM, "--out", str(copy), "--int8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "int8" in line]
    assert len(lines) == 1 and lines[0].startswith("  int8: offered: macro AUC changed by")


def test_predict_and_the_command_take_the_int8_runtime(int8_bundle, tiny_bundle, flat, tmp_path, capsys):
    """`predict(runtime="onnx-int8")` runs the checked int8 files (close to fp32); a bundle without them is refused
    by `tlese predict --runtime onnx-int8` in one line naming why."""
    from tlese.bundle.format import load_bundle
    from tlese.cli import main
    from tlese.predict.pipeline import predict

    bundle = load_bundle(int8_bundle)
    predict(bundle, [flat], tmp_path / "int8", salt="s", runtime="onnx-int8")
    predict(bundle, [flat], tmp_path / "fp32", salt="s", runtime="onnx")
    int8, fp32 = (json.loads((tmp_path / name / "predictions.json").read_text())["breasts"]
                  for name in ("int8", "fp32"))
    assert int8.keys() == fp32.keys() and len(int8) == 4
    for key in int8:
        for name, value in int8[key]["probabilities"].items():
            assert abs(value - fp32[key]["probabilities"][name]) <= 1e-2
    assert main(["predict", str(tiny_bundle), str(flat), "--out", str(tmp_path / "no"), "--runtime", "onnx-int8"]) == 2
    said = capsys.readouterr()
    text = said.out + said.err
    assert "no int8 ONNX files" in text and "--int8" in text and "Traceback" not in text
