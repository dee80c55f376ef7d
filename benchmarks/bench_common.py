"""Shared helpers for the model benchmarks: machine info, interleaved timing, activation memory, markdown."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINES = ("resnet50", "densenet121")  # ratio columns: TLese speed over these


def machine(packages: tuple[str, ...] = ("torch", "torchvision", "numpy")) -> dict:
    """CPU model, cores, torch threads, load average and the versions of `packages`: the context of a timing."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "loadavg_1_5_15": load,
        **{package: version(package) for package in packages},
    }


def command_line(script: str, argv: list[str] | None) -> str:
    """How the benchmark was invoked, for the results header (`python benchmarks/<script> <args>`)."""
    import sys

    return (f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def publish(results: dict, text: str, out: Path, stem: str, write: bool) -> None:
    """Print the Markdown table; with `write`, also save `<out>/<stem>.json` (the numbers) and `<stem>.md`."""
    import json

    print(text, flush=True)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def header(title: str, results: dict) -> list[str]:
    info = results["machine"]
    return [
        f"# {title}", "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), load average at "
        f"start {' '.join(info['loadavg_1_5_15'])}  ",
        f"Versions: python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"numpy {info['numpy']}", "",
    ]


def build(name: str, channels_last: bool = False, train: bool = False) -> nn.Module:
    """A registered model as the project builds it (4 classes, grayscale), random init (speed does not depend on
    the weights), input check off."""
    from tlese.models import create_model

    model = create_model(name, num_classes=4, in_chans=1)
    model.check_input = False
    model.train(train)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def interleaved(steps: dict[str, Callable[[], None]], reps: int, iters: int = 1, warmup: int = 1,
                pause: float = 0.0) -> dict:
    """Seconds per call of each step, measured round-robin: every repetition runs every step `iters` times, so
    background load hits all of them alike. `pause` seconds (untimed) precede each step's calls. Returns
    {name: [seconds per call, one per repetition]}."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            times[name].append((time.perf_counter() - start) / iters)
    return times


def summarise(times: dict[str, list[float]], batch: int, baselines: Sequence[str] = BASELINES) -> dict:
    """Per model: median / min / max images per second, median latency, and the speed ratio over each baseline,
    paired per repetition (same round) -> median (min-max) of the paired ratios."""
    out = {}
    for name, seconds in times.items():
        rates = [batch / s for s in seconds]
        row = {
            "ms_median": round(1000 * statistics.median(seconds), 1),
            "img_s_median": round(statistics.median(rates), 2),
            "img_s_min": round(min(rates), 2),
            "img_s_max": round(max(rates), 2),
            "reps": len(seconds),
        }
        for base in baselines:
            if base in times:
                paired = [b / s for s, b in zip(seconds, times[base])]
                row[f"x_{base}"] = round(statistics.median(paired), 2)
                row[f"x_{base}_range"] = [round(min(paired), 2), round(max(paired), 2)]
        out[name] = row
    return out


def speed_table(rows: dict, baselines: Sequence[str] = BASELINES) -> list[str]:
    present = [b for b in baselines if any(f"x_{b}" in r for r in rows.values())]
    lines = ["| model | img/s median | img/s min-max | ms/batch median | "
             + " | ".join(f"x {b} (min-max)" for b in present) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(present)]
    for name, r in rows.items():
        ratios = " | ".join(f"**{r[f'x_{b}']}** ({r[f'x_{b}_range'][0]}-{r[f'x_{b}_range'][1]})" for b in present)
        lines.append(f"| {name} | {r['img_s_median']} | {r['img_s_min']}-{r['img_s_max']} | {r['ms_median']} | "
                     f"{ratios} |")
    return lines


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training-mode forward (parameters
    excluded), via torch.autograd.graph.saved_tensors_hooks. This is the activation memory that training must
    hold at the peak (the end of the forward); it scales linearly with the batch."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in params and pointer not in seen:
            seen[pointer] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)  # the graph (and so every saved storage) stays alive until `out` goes: no pointer reuse
    total = sum(seen.values())
    del out
    model.train(was_training)
    return total
