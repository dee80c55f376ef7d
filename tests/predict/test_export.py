"""ONNX export (tlese.bundle.onnx, re-exported by tlese.predict.export): PyTorch/ONNX Runtime parity, dynamic batch, a
valid file, the features output, the wrapper's checks, and a smoke run of benchmarks/bench_onnx.py.

Random-init models are useless for parity: their features vanish (BN running stats are the init's 0 / 1), so the
logits are the head bias whatever the graph computes. `_calibrated` gives every BN the batch statistics of one
train-mode forward and random affine terms, and every ESE gate random weights, so logits depend on the whole net.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from tlese.bundle.onnx import OnnxModel, check_onnx, export_onnx, input_shape, quantize_onnx  # noqa: E402
from tlese.models import create_model  # noqa: E402
from tlese.models.blocks import EffectiveSE  # noqa: E402

SIZE = 64
TOLERANCE = 1e-4  # max |logit difference|, absolute for logits up to 1 in size, relative beyond
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _calibrated(name: str, views: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=4, in_chans=1, views=views)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one forward sets the running stats to its batch's
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
        elif isinstance(module, EffectiveSE):
            nn.init.normal_(module.fc.weight, std=0.1)
    model.train()
    with torch.no_grad():
        model(torch.rand(input_shape(SIZE, views, 1, batch=4)))
    return model.eval()


def _inputs(views: str, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(input_shape(SIZE, views, 1, batch), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lite0_dual(tmp_path_factory):
    model = _calibrated("tlese_lite0", "dual")
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "lite0_dual.onnx", SIZE, "dual")


@pytest.mark.parametrize(
    "name, views",
    [("tlese_mbv2", "single"), ("tlese_mbv2", "dual"), ("tlese_lite0", "single"), ("resnet50", "single")],
)
def test_parity(tmp_path, name, views):
    model = _calibrated(name, views)
    path = export_onnx(model, tmp_path / f"{name}.onnx", SIZE, views)
    x = _inputs(views, batch=2)
    with torch.no_grad():
        scale = max(1.0, float(model(x).abs().max()))
    assert scale < 50  # calibrated: logits of a sane size, not vanished or exploded
    assert check_onnx(model, path, x) <= TOLERANCE * scale


def test_parity_lite0_dual_and_dynamic_batch(lite0_dual):
    model, path = lite0_dual
    runner = OnnxModel(path, threads=1)
    assert runner.input_shape == (None, 2, 1, SIZE, SIZE)
    for batch in (1, 3):  # exported from an example batch of 2: batch is a symbolic axis
        x = _inputs("dual", batch, seed=batch)
        assert runner(x.numpy()).shape == (batch, 4)
        assert check_onnx(model, runner, x) <= TOLERANCE
    with torch.no_grad():  # the logits do depend on the input (the calibration worked)
        a, b = model(_inputs("dual", 1, seed=5)), model(_inputs("dual", 1, seed=6))
    assert float((a - b).abs().max()) > 1e-3


def test_file_is_valid_self_contained_with_metadata(lite0_dual):
    model, path = lite0_dual
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert not [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not list(path.parent.glob("*.data"))
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops and "Pad" not in ops  # BN folded, SAME pads constant (fused by ORT)
    meta = OnnxModel(path).metadata
    assert meta["tlese.model"] == "tlese_lite0" and meta["tlese.views"] == "dual"
    assert meta["tlese.input_shape"] == f"2x1x{SIZE}x{SIZE}" and meta["tlese.num_classes"] == "4"
    assert model.training is False and model.check_input is True  # export worked on a copy


def test_the_prediction_library_re_exports_the_bundles_onnx_code():
    import tlese.bundle.onnx as bundle_onnx
    import tlese.predict.export as export

    for name in ("OnnxModel", "check_onnx", "export_onnx", "input_shape", "quantize_onnx", "session_options",
                 "export_bundle_onnx"):
        assert getattr(export, name) is getattr(bundle_onnx, name)


def test_features_output_matches_the_models_features_and_bytes_load_like_a_file(tmp_path):
    from tlese.bundle.onnx import FEATURES_NAME, OUTPUT_NAME, export_bundle_onnx
    from tlese.bundle.ood import feature_extractor

    model = _calibrated("tlese_mbv2", "dual")
    x = _inputs("dual", batch=3, seed=4)
    entries = export_bundle_onnx([model], tmp_path, folds=[7], views="dual", image_size=SIZE,
                                 references=list(x.numpy()))
    assert [(e["file"], e["fold"], e["outputs"]) for e in entries] == [("onnx/fold_7.onnx", 7, ["logits", "features"])]
    path = tmp_path / entries[0]["file"]
    assert entries[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entries[0]["max_abs_diff"] <= TOLERANCE and entries[0]["within_tolerance"]
    runner = OnnxModel(path.read_bytes(), threads=1, name="fold_7.onnx")  # from bytes, as a zipped bundle reads it
    assert runner.output_names == [OUTPUT_NAME, FEATURES_NAME] and "fold_7.onnx" in repr(runner)
    logits, features = runner.run(x.numpy())
    with torch.no_grad():
        want_logits, want_features = model(x).numpy(), feature_extractor(model)(x).numpy()
    assert features.shape == want_features.shape == (3, 2, model.num_features)
    assert np.abs(logits - want_logits).max() <= TOLERANCE and np.abs(features - want_features).max() <= TOLERANCE
    assert np.array_equal(runner(x.numpy()), logits)  # __call__: the logits only
    with pytest.raises(ValueError, match="out_dir, views, image_size and reference inputs"):
        export_bundle_onnx([model], tmp_path)


def test_export_leaves_the_model_alone_and_checks_views(tmp_path):
    model = create_model("tlese_mbv2", num_classes=2, in_chans=1, views="single")
    model.train()
    with pytest.raises(ValueError, match="single-view"):
        export_onnx(model, tmp_path / "x.onnx", SIZE, "dual")
    path = export_onnx(model, tmp_path / "x.onnx", (SIZE, SIZE + 16))  # views from the model; H != W
    assert model.training and model.check_input
    assert OnnxModel(path).input_shape == (None, 1, SIZE, SIZE + 16)


def test_onnx_model_refuses_bad_input(lite0_dual):
    _, path = lite0_dual
    runner = OnnxModel(path, threads=1)
    with pytest.raises(ValueError, match="expected input"):
        runner(np.zeros((1, 1, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match="expected input"):
        runner(np.zeros((1, 2, 1, SIZE + 1, SIZE), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        runner(np.full((1, 2, 1, SIZE, SIZE), 255.0, np.float32))
    assert OnnxModel(path, check_input=False)(np.full((1, 2, 1, SIZE, SIZE), 2.0)).shape == (1, 4)
    with pytest.raises(FileNotFoundError):
        OnnxModel(path.with_name("missing.onnx"))


def test_quantize_runs_and_stays_close(lite0_dual, tmp_path):
    model, path = lite0_dual
    calibration = [_inputs("dual", 1, seed=10 + i).numpy() for i in range(4)]
    quantized = quantize_onnx(path, tmp_path / "int8.onnx", calibration)
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert "QuantizeLinear" in ops and not list(tmp_path.glob("*.pre.onnx"))
    x = _inputs("dual", 2, seed=20)
    with torch.no_grad():
        expected = model(x).numpy()
    got = OnnxModel(quantized, threads=1)(x.numpy())
    assert got.shape == expected.shape and np.all(np.isfinite(got))


def test_bench_onnx_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_onnx", BENCHMARKS / "bench_onnx.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--models", "tlese_lite0", "--threads", "1", "--write", "--out",
                           str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "onnx.json").read_text())
    assert results["size"] == 64 and results["ort"]["tlese_lite0"]["ms_best"] > 0
    assert {"tlese_lite0 view-parallel", "tlese_lite0 int8"} <= set(results["ort"])
    assert results["eager"]["tlese_lite0"]["ms_median"] > 0
    assert results["command"] and "onnxruntime" in results["machine"]
    text = (tmp_path / "onnx.md").read_text()
    assert "## Goals" in text and "| tlese_lite0 |" in text
