"""Smoke test: the preparation benchmark runs end to end on a tiny input, so it never rots."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_prepare.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_prepare", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_one_tiny_iteration():
    bench = _load()
    results = bench.run(n_repeat=1, workers=1, size=64, mias_limit=2, cbis_limit=1, include_native=False)
    assert results["size"] == 64
    for entry in results["sets"].values():  # empty when the real data is absent: run() must still work
        assert entry["miss_images_per_s"] > 0 and entry["cached_images_per_s"] > 0
        assert {"read_decode", "preprocess", "write_png"} <= set(entry["ms_per_image_single_process"])
    results.update(date="today", machine=bench.machine(), command="bench")
    assert "| set | images |" in bench.to_markdown(results, "bench")
