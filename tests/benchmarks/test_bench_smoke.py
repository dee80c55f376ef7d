"""Smoke test: every model benchmark script runs one tiny iteration end to end (and writes its files into a
temporary folder, never into benchmarks/results), so the scripts never rot. bench_prepare.py has its own smoke
test in tests/data/test_bench_prepare.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = ["tlese_mbv2", "resnet50"]  # one TLese model and the headline baseline


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # the scripts' main() sets torch's thread count
    yield
    torch.set_num_threads(threads)


def test_bench_cost_tiny(tmp_path):
    bench = _load("bench_cost")
    assert bench.main(["--models", "tlese_mbv2", "mbv2_plain", "--sizes", "32", "--write", "--out",
                       str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cost.json").read_text())
    row = results["models"]["tlese_mbv2"]
    assert row["params_M"] > 2 and row["act_MB_per_img@32"] > 0 and "ese_flops_added_%@32" in row
    assert "| tlese_mbv2 |" in (tmp_path / "cost.md").read_text()
    assert {"cpu", "cores", "torch"} <= set(results["machine"]) and results["command"] and results["date"]


def test_bench_speed_tiny(tmp_path):
    bench = _load("bench_speed")
    argv = ["--models", *TINY, "--infer", "1:nchw", "2:channels_last", "--infer-size", "32", "--infer-reps", "1",
            "--train-sizes", "32", "--train-batch", "2", "--train-reps", "1", "--loader-images", "2",
            "--profile-models", "tlese_mbv2", "--profile-train-size", "32", "--write", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    rows = results["inference"]["b1@32 nchw"]
    assert rows["resnet50"]["x_resnet50"] == 1.0 and rows["tlese_mbv2"]["img_s_median"] > 0
    assert "x_resnet50" in results["training"]["b2@32 nchw"]["tlese_mbv2"]
    assert results["loader"]["workers"]["0"]["img_s_median"] > 0
    assert results["profiles"][0]["ops"]
    text = (tmp_path / "speed.md").read_text()
    assert "## Goals (TLese)" in text and "keep up" in text


def test_bench_scaling_tiny(tmp_path):
    bench = _load("bench_scaling")
    assert bench.main(["--models", *TINY, "--sizes", "32", "48", "--reps", "1", "--write", "--out",
                       str(tmp_path)]) == 0
    results = json.loads((tmp_path / "scaling.json").read_text())
    assert len(results["models"]["resnet50"]["latency_ms"]) == 2
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_bench_gpu_without_cuda_and_tiny_cpu_path(tmp_path, capsys):
    bench = _load("bench_gpu")
    if not torch.cuda.is_available():
        assert bench.main(["--write", "--out", str(tmp_path)]) == 0
        assert "no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())
        assert bench.main(["--require-cuda"]) == 1
    # the measuring code path, on the CPU with tiny sizes (bf16 autocast works on CPU too)
    results = bench.run(TINY, size=32, infer_batch=2, train_batch=2, reps=1, iters=1, warmup=1, device="cpu")
    results.update(command="bench", date="today", machine=bench.machine(), card="cpu", cuda=None)
    assert "x resnet50" in bench.to_markdown(results)
    assert results["training"]["b2@32"]["tlese_mbv2"]["img_s_median"] > 0
