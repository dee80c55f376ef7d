"""GPU speed: inference and training images/s at 512 x 512 on CUDA, AMP bf16 + channels-last, same protocol and
tables as bench_speed.py (every model in one process, interleaved round-robin, median and min-max, ratios to
ResNet-50 and DenseNet-121). Records the card's name and the date. Sized to finish in a few minutes on one
H100-class card (about 2-4 minutes with the defaults).

    .venv/bin/python benchmarks/bench_gpu.py --write        # writes benchmarks/results/gpu.md and .json

Without a CUDA device it prints why and exits with status 0 (status 1 with --require-cuda), measuring nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, build, command_line, header, machine, now, publish, speed_table, summarise  # noqa: E402

MODELS = ("tlese_mbv2", "tlese_lite0", "mbv2_plain", "lite0_plain", "mobilenet_v2", "resnet50", "densenet121")


def _steps(models: Sequence[str], batch: int, size: int, train: bool, device: str, amp: bool) -> dict:
    x = torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch, device=device) % 4
    steps = {}
    for name in models:
        torch.manual_seed(0)
        model = build(name, channels_last=True, train=train).to(device)
        autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp)
        if train:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer, autocast=autocast):
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
        else:
            def step(model=model, autocast=autocast):
                with torch.inference_mode(), autocast:
                    model(x)
        steps[name] = step
    return steps


def _interleaved_sync(steps: dict, reps: int, iters: int, warmup: int, sync) -> dict:
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / iters)
    return times


def run(models: Sequence[str] = MODELS, size: int = 512, infer_batch: int = 64, train_batch: int = 32,
        reps: int = 5, iters: int = 10, warmup: int = 5, device: str = "cuda", amp: bool = True) -> dict:
    """`device` other than cuda is only for testing the code path (e.g. "cpu" with tiny sizes)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    results: dict = {"size": size, "amp": "bf16" if amp else "fp32", "layout": "channels_last",
                     "protocol": {"reps": reps, "iters": iters, "warmup": warmup}, "inference": {}, "training": {}}
    for section, batch, train in (("inference", infer_batch, False), ("training", train_batch, True)):
        times = _interleaved_sync(_steps(models, batch, size, train, device, amp), reps, iters, warmup, sync)
        results[section][f"b{batch}@{size}"] = summarise(times, batch)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def to_markdown(results: dict) -> str:
    lines = header("GPU speed: inference and training throughput", results)
    proto = results["protocol"]
    lines += [f"Card: {results['card']}, CUDA {results['cuda']}, {results['amp']} autocast, channels-last, "
              f"cudnn.benchmark. Every model in one process, interleaved: {proto['reps']} repetitions of "
              f"{proto['iters']} calls after {proto['warmup']} warm-up calls; img/s median and min-max, `x base` "
              "paired per repetition. 4-class head, 1 input channel.", ""]
    for section, title in (("inference", "Inference"), ("training", "Training (forward + backward + AdamW)")):
        for key, rows in results[section].items():
            lines += [f"## {title}, batch {key}", "", *speed_table(rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--fp32", action="store_true", help="no autocast")
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 (not 0) when there is no CUDA device")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/gpu.md and .json")
    parser.add_argument("--out", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device available (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}); nothing measured. Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 1 if args.require_cuda else 0
    command = command_line("bench_gpu.py", argv)
    info = machine()
    results = run(args.models, args.size, args.infer_batch, args.train_batch, args.reps, args.iters, args.warmup,
                  amp=not args.fp32)
    results.update(command=command, date=now(), machine=info, card=torch.cuda.get_device_name(0),
                   cuda=torch.version.cuda)
    publish(results, to_markdown(results), args.out, "gpu", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
