"""`tlese export BUNDLE --onnx`: the bundle's ONNX files and a parity report against its torch outputs on the reference
cases (exit 2 beyond 1e-4); and `predict --runtime onnx` giving the torch runtime's probabilities from the bundle's own
ONNX files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

slow = pytest.mark.slow
TOLERANCE = 1e-4


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


def test_export_needs_a_format(tmp_path, capsys):
    from tlese.cli import main

    assert main(["export", str(tmp_path / "bundle"), "--out", str(tmp_path / "out")]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@slow
def test_export_writes_the_bundles_onnx_files_and_a_parity_report_within_1e_4(tiny_bundle, tmp_path, capsys):
    from tlese.bundle.format import load_bundle
    from tlese.bundle.onnx import OnnxModel, softmax
    from tlese.cli import main

    out = tmp_path / "deploy"
    assert main(["export", str(tiny_bundle), "--onnx", "--out", str(out), "--allow-unsigned"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("ONNX: 3 file(s) in ") and "on 3 reference cases" in printed
    assert "within 0.0001" in printed
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["reference_cases"] == 3 and 0 <= report["max_abs_diff"] <= TOLERANCE
    assert report["max_abs_diff"] == max(report["max_abs_diff_by_output"].values())
    assert report["origin"].startswith("carried by the bundle")
    bundle = load_bundle(tiny_bundle, allow_unsigned=True)
    assert report["bundle_sha256"] == bundle.sha256
    for index, entry in enumerate(bundle.onnx):  # the very files the bundle carries ...
        written = out / entry["file"]
        assert hashlib.sha256(written.read_bytes()).hexdigest() == entry["sha256"]
        # ... which reproduce the bundle's fold models on inputs the parity check never saw.
        x = np.random.default_rng(index).random((2, 2, 1, 32, 32), dtype=np.float32)
        probabilities = softmax(OnnxModel(written, threads=1)(x))
        assert np.abs(probabilities - bundle.predict_arrays(x)["per_model"][index]).max() <= TOLERANCE


@slow
def test_export_exits_2_when_the_onnx_files_do_not_match_the_torch_models(tiny_bundle, tmp_path, capsys):
    from tlese.bundle.format import write_checksums
    from tlese.cli import main

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    (copy / "signature.json").unlink(missing_ok=True)
    target = copy / "onnx" / "fold_2.onnx"
    shutil.copy(copy / "onnx" / "fold_0.onnx", target)  # fold 0's model where fold 2's should be
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    _edit_json(copy / "model.json", lambda meta: meta["onnx"][2].update(sha256=sha))
    write_checksums(copy)
    out = tmp_path / "out"
    assert main(["export", str(copy), "--onnx", "--out", str(out), "--allow-unsigned"]) == 2
    captured = capsys.readouterr().out
    assert "WARNING: bundle not verified (unsigned" in captured and "EXCEEDS 0.0001" in captured
    report = json.loads((out / "parity.json").read_text())
    assert not report["passed"] and report["max_abs_diff_by_output"]["per_model"] > TOLERANCE


@slow
def test_a_bundle_without_onnx_files_is_exported_now(tiny_bundle, tmp_path, capsys):
    from tlese.bundle.format import write_checksums
    from tlese.cli import main

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    (copy / "signature.json").unlink(missing_ok=True)
    shutil.rmtree(copy / "onnx")
    _edit_json(copy / "model.json", lambda meta: meta.pop("onnx"))
    write_checksums(copy)
    out = tmp_path / "out"
    assert main(["export", str(copy), "--onnx", "--out", str(out), "--allow-unsigned"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["origin"].startswith("exported now") and report["passed"]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == [f"fold_{k}.onnx" for k in range(3)]
    assert "within 0.0001" in capsys.readouterr().out


@slow
def test_predict_with_the_onnx_runtime_gives_the_torch_probabilities(tiny_bundle, flat, tmp_path, capsys):
    from tlese.cli import main

    results = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        assert main(["predict", str(tiny_bundle), str(flat), "--out", str(out), "--salt", "s", "--runtime", runtime,
                     "--allow-unsigned"]) == 0
        results[runtime] = json.loads((out / "predictions.json").read_text())["breasts"]
    printed = capsys.readouterr().out
    assert "exporting its models" not in printed  # the bundle's own ONNX files, no export per call
    assert results["torch"].keys() == results["onnx"].keys() and results["torch"]
    compared = 0
    for key, want in results["torch"].items():
        got = results["onnx"][key]
        assert got["verdict"] == want["verdict"]
        if want["probabilities"] is not None:
            for name, value in want["probabilities"].items():
                assert abs(got["probabilities"][name] - value) <= TOLERANCE
            compared += 1
    assert compared


def test_evaluate_takes_the_bundles_own_task_unless_told_and_accepts_inline_tasks(tmp_path):
    from types import SimpleNamespace

    from tlese.data.tasks import get_task
    from tlese.predict.commands import _task

    own = get_task("synth_subtype4")
    bundle = SimpleNamespace(task=own)
    assert _task(None, bundle) is own
    assert _task("synth_cxr3", bundle) is get_task("synth_cxr3")
    inline = _task("{name: pair, label_column: subtype, classes: [a, b]}", bundle)
    assert (inline.name, inline.classes) == ("pair", ("a", "b"))
    path = tmp_path / "task.yaml"
    path.write_text("name: from_file\nlabel_column: subtype\nclasses: [x, y, z]\n")
    assert _task(str(path), bundle).classes == ("x", "y", "z")
    with pytest.raises(ValueError, match="unknown task"):
        _task("no_such_task", bundle)
