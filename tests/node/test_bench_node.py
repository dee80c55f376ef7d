"""Smoke run of benchmarks/bench_node.py: one study through a real Orthanc and the node, results not written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from orthanc import ORTHANC

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_node.py"


def test_bench_node_smoke(tmp_path, node_bundle_path, cbis_dicoms, capsys):
    if not ORTHANC.is_file():
        pytest.skip(f"Orthanc is not installed at {ORTHANC}")
    spec = importlib.util.spec_from_file_location("bench_node", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--bundle", str(node_bundle_path), "--studies", "2", "--quiet-seconds", "0.5",
                       "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    burst = json.loads(printed.strip().splitlines()[-1])
    assert burst["studies"] == 2 and burst["images"] == 8 and burst["all_delivered_once"]
    assert 0.5 <= burst["latency_p50"] <= burst["latency_p95"] <= burst["latency_max"]
    assert "| 2 | 8 |" in printed and not list(tmp_path.iterdir())  # nothing written without --write
