"""CPU speed: inference and training throughput of every model in one process, interleaved, with ratios to
ResNet-50 and DenseNet-121; the prepared-PNG loader against TLese training; a torch.profiler breakdown of TLese.

Protocol: all models are built once; each repetition runs every model in turn (round-robin), so load from other
jobs on this shared machine hits all of them alike. Reported: median and min-max images/s over the repetitions,
and the speed ratio over each baseline paired per repetition (median, min-max). One warm-up call per model first.
Inference: `torch.inference_mode`, eval mode, NCHW and channels-last. Training: forward + cross-entropy + backward
+ AdamW step, train mode, NCHW as `tlese train` runs on CPU (channels-last is GPU-only there). ONNX Runtime is not
measured: there is no ONNX export yet and onnxruntime is not installed.

    .venv/bin/python benchmarks/bench_speed.py --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    RESULTS,
    build,
    command_line,
    header,
    interleaved,
    machine,
    now,
    publish,
    speed_table,
    summarise,
)

# mobilenet_v2 is mbv2_plain's architecture
MODELS = ("tlese_mbv2", "tlese_lite0", "mbv2_plain", "lite0_plain", "resnet50", "densenet121")
TLESE = ("tlese_mbv2", "tlese_lite0")
LARGE_TRAIN_MODELS = ("tlese_mbv2", "tlese_lite0", "resnet50", "densenet121")
GOALS = {"inference": {"resnet50": 4.0, "densenet121": 2.5}, "training": {"resnet50": 2.5, "densenet121": 2.0}}


def inference_steps(models: Sequence[str], batch: int, size: int, channels_last: bool) -> dict:
    steps = {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(batch, 1, size, size).contiguous(memory_format=fmt)
    for name in models:
        torch.manual_seed(0)
        model = build(name, channels_last=channels_last, train=False)

        def step(model=model):
            with torch.inference_mode():
                model(x)

        steps[name] = step
    return steps


def training_steps(models: Sequence[str], batch: int, size: int, channels_last: bool = False) -> dict:
    steps = {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(batch, 1, size, size).contiguous(memory_format=fmt)
    y = torch.arange(batch) % 4
    for name in models:
        torch.manual_seed(0)
        model = build(name, channels_last=channels_last, train=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[name] = step
    return steps


def loader_throughput(n_images: int, size: int, batch: int, workers: Sequence[int], passes: int) -> dict:
    """Images/s of `tlese.data.loader.ImageDataset` over prepared 16-bit PNGs (written with write_png16), through a
    DataLoader as `tlese train` builds it, with the mammography training augmentation. Worker start-up excluded
    (persistent workers, one warm-up pass)."""
    import pandas as pd
    from torch.utils.data import DataLoader

    from tlese.data.cache import write_png16
    from tlese.data.loader import ImageDataset
    from tlese.data.transforms import build_transforms

    rng = np.random.default_rng(0)
    out = {"images": n_images, "size": size, "batch": batch, "passes": passes, "workers": {}}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
        rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
        paths = []
        for index in range(n_images):  # breast-like smooth shape + quantum noise: compresses like a real image
            image = np.clip(0.6 * np.exp(-((rows - 0.5) ** 2 + cols**2) / 0.3) + rng.normal(0, 0.015, rows.shape),
                            0, 1).astype(np.float32)
            paths.append(str(Path(scratch) / f"{index}.png"))
            write_png16(image, paths[-1])
        table = pd.DataFrame({"prepared_path": paths, "target": [i % 4 for i in range(n_images)]})
        dataset = ImageDataset(table, transform=build_transforms("mammo", train=True, seed=0))
        for count in workers:
            loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=count,
                                persistent_workers=count > 0, drop_last=False)
            start = time.perf_counter()
            for _ in loader:  # warm-up pass: starts the workers
                pass
            startup = time.perf_counter() - start
            rates = []
            for _ in range(passes):
                start = time.perf_counter()
                for _ in loader:
                    pass
                rates.append(n_images / (time.perf_counter() - start))
            out["workers"][count] = {"img_s_median": round(statistics.median(rates), 1),
                                     "img_s_min": round(min(rates), 1), "img_s_max": round(max(rates), 1),
                                     "first_pass_s": round(startup, 2)}
            del loader
    return out


def profile(name: str, kind: str, batch: int, size: int, top: int = 12) -> dict:
    """torch.profiler over one call (after a warm-up): self CPU time per aten op, top `top`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    make = inference_steps if kind == "inference" else training_steps
    step = make([name], batch, size, channels_last=False)[name]
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"model": name, "kind": kind, "batch": batch, "size": size, "total_self_ms": round(total / 1000, 1),
            "ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1),
                     "share_%": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count}
                    for e in events[:top]]}


def run(
    models: Sequence[str] = MODELS,
    infer: Sequence[str] = ("1:nchw", "1:channels_last", "16:nchw"),
    infer_size: int = 512,
    infer_reps: int = 3,
    train_sizes: Sequence[int] = (224, 512),
    train_batch: int = 16,
    train_reps: int = 2,
    train_iters: int = 1,
    train_large_models: Sequence[str] | None = LARGE_TRAIN_MODELS,
    train_large_batch: int = 4,
    loader_images: int = 64,
    loader_workers: Sequence[int] = (0, 2),
    loader_passes: int = 2,
    profile_models: Sequence[str] = TLESE,
    profile_size: int = 512,
    profile_train_size: int = 224,
    log=print,
    on_section=None,
) -> dict:
    """infer: "BATCH:LAYOUT" entries (layout nchw or channels_last). Inference at batch > 1 and training at sizes
    >= 384 use `train_large_models` (None: all `models`) to keep the run short; training at sizes >= 384 uses batch
    `train_large_batch` (DenseNet-121 at 512 x 16 needs > 12 GB of activations, more than this shared machine has
    free). `on_section(results)` is called after each section (partial results survive a killed run).
    Warm-up: 2 calls for batch-1 inference (cheap),
    1 otherwise (first call builds the oneDNN kernels and AdamW's state)."""
    results: dict = {"models": list(models), "inference": {}, "training": {}, "protocol": {
        "infer_reps": infer_reps, "train_reps": train_reps, "train_iters": train_iters, "warmup": "2 (batch-1 "
        "inference) / 1", "threads": torch.get_num_threads()}}
    for spec in infer:
        batch, layout = spec.split(":")
        batch = int(batch)
        key = f"b{batch}@{infer_size} {layout}"
        chosen = [m for m in models if batch == 1 or train_large_models is None or m in train_large_models]
        times = interleaved(inference_steps(chosen, batch, infer_size, layout == "channels_last"), infer_reps,
                            warmup=2 if batch == 1 else 1)
        results["inference"][key] = summarise(times, batch)
        log(f"inference {key}: " + ", ".join(f"{m} {r['img_s_median']}" for m, r in
                                               results["inference"][key].items()))
        if on_section:
            on_section(results)
    for size in train_sizes:
        batch = train_batch if size < 384 else train_large_batch
        key = f"b{batch}@{size} nchw"
        chosen = [m for m in models if size < 384 or train_large_models is None or m in train_large_models]
        times = interleaved(training_steps(chosen, batch, size), train_reps, iters=train_iters, warmup=1)
        results["training"][key] = summarise(times, batch)
        log(f"training {key}: " + ", ".join(f"{m} {r['img_s_median']}" for m, r in results["training"][key].items()))
        if on_section:
            on_section(results)
    if loader_images:
        results["loader"] = loader_throughput(loader_images, infer_size, train_batch, loader_workers, loader_passes)
        log(f"loader: {results['loader']['workers']}")
    results["profiles"] = [profile(name, kind, batch, size)
                           for name in profile_models
                           for kind, batch, size in (("inference", 1, profile_size),
                                                     ("training", train_batch, profile_train_size))]
    return results


def _verdicts(results: dict) -> list[str]:
    lines = []
    for section, goals in GOALS.items():
        for key, rows in results[section].items():
            for name in TLESE:
                if name not in rows:
                    continue
                parts = []
                for base, goal in goals.items():
                    if f"x_{base}" in rows[name]:
                        ratio = rows[name][f"x_{base}"]
                        parts.append(f"{ratio}x {base} ({'meets' if ratio >= goal else 'misses'} >= {goal}x)")
                if parts:
                    lines.append(f"- {section} {key}, {name}: " + ", ".join(parts))
    return lines


def to_markdown(results: dict) -> str:
    proto = results["protocol"]
    lines = header("CPU speed: inference and training throughput", results)
    lines += [
        f"Every model in one process, interleaved round-robin; inference {proto['infer_reps']} repetitions, training "
        f"{proto['train_reps']} repetitions of {proto['train_iters']} step(s), warm-up calls per model: "
        f"{proto['warmup']} "
        f"(the first call of a new shape builds oneDNN kernels). {proto['threads']} torch thread(s): see README "
        "(with 2 threads on this shared 2-core machine OpenMP barriers stall under the other jobs' load, 2-6x "
        "slower and hitting small-op networks hardest). "
        "img/s: median and min-max over repetitions; `x base`: speed over that baseline paired per repetition, "
        "median (min-max). 4-class head, 1 input channel, random init, fp32, PyTorch eager. ONNX Runtime: not "
        "measured (no ONNX export yet, onnxruntime not installed).", "",
        "The machine is shared with training jobs (see load average): absolute numbers are noisy, the ratios "
        "(measured under the same load) are the headline.", "",
    ]
    for section, title in (("inference", "Inference (`inference_mode`, eval)"),
                           ("training", "Training (forward + backward + AdamW step)")):
        for key, rows in results[section].items():
            lines += [f"## {title}, batch {key}", "", *speed_table(rows), ""]
    lines += ["## Goals (TLese)", "", *_verdicts(results), ""]
    if "loader" in results:
        loader = results["loader"]
        lines += ["## Does the loader keep up with training?", "",
                  f"`ImageDataset` over {loader['images']} prepared {loader['size']} x {loader['size']} 16-bit PNGs "
                  f"(`write_png16`), DataLoader batch {loader['batch']}, mammography training augmentation, "
                  f"{loader['passes']} timed passes after a warm-up pass (worker start-up excluded).", "",
                  "| workers | img/s median | min-max | first pass s |", "|---:|---:|---:|---:|"]
        for count, r in loader["workers"].items():
            lines.append(f"| {count} | {r['img_s_median']} | {r['img_s_min']}-{r['img_s_max']} | "
                         f"{r['first_pass_s']} |")
        key = next((k for k in results["training"] if f"@{loader['size']}" in k), None)
        if key:
            single = loader["workers"].get(0, loader["workers"].get("0"))
            lines.append("")
            for name in TLESE:
                if name in results["training"][key]:
                    train = results["training"][key][name]["img_s_median"]
                    text = f"- {name} trains at {train} img/s ({key})"
                    if single:
                        share = 100 * train / single["img_s_median"]
                        text += (f"; the in-process loader delivers {single['img_s_median']} img/s, so loading costs "
                                 f"~{share:.0f} % of the training time on the same cores "
                                 f"({'keeps up' if share < 100 else 'does NOT keep up'})")
                    lines.append(text + ".")
        lines.append("")
    for prof in results.get("profiles", []):
        lines += [f"## Profile: {prof['model']} {prof['kind']}, batch {prof['batch']} @ {prof['size']} "
                  f"(torch.profiler, self CPU time of aten ops, total {prof['total_self_ms']} ms)", "",
                  "| op | self ms | share % | calls |", "|---|---:|---:|---:|"]
        lines += [f"| {op['op']} | {op['self_ms']} | {op['share_%']} | {op['calls']} |" for op in prof["ops"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--infer", nargs="+", default=["1:nchw", "1:channels_last", "16:nchw"],
                        help="BATCH:LAYOUT entries, layout nchw or channels_last")
    parser.add_argument("--infer-size", type=int, default=512)
    parser.add_argument("--infer-reps", type=int, default=3)
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-reps", type=int, default=2)
    parser.add_argument("--train-iters", type=int, default=1, help="steps per model per repetition")
    parser.add_argument("--train-large-models", nargs="+", default=list(LARGE_TRAIN_MODELS),
                        help="models for inference at batch > 1 and training at sizes >= 384 ('all': every model)")
    parser.add_argument("--train-large-batch", type=int, default=4, help="training batch at sizes >= 384")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see README)")
    parser.add_argument("--loader-images", type=int, default=64, help="0 skips the loader measurement")
    parser.add_argument("--profile-models", nargs="*", default=list(TLESE))
    parser.add_argument("--profile-train-size", type=int, default=224)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/speed.md and .json")
    parser.add_argument("--out", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = command_line("bench_speed.py", argv)
    torch.set_num_threads(args.threads)
    info = machine()
    large = None if args.train_large_models == ["all"] else args.train_large_models
    def save(partial: dict, name: str = "speed.partial.json") -> None:
        if args.write:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / name).write_text(json.dumps({**partial, "command": command, "machine": info}, indent=2))

    results = run(args.models, args.infer, args.infer_size, args.infer_reps, args.train_sizes,
                  args.train_batch, args.train_reps, args.train_iters, large, args.train_large_batch,
                  args.loader_images,
                  profile_models=args.profile_models, profile_size=args.infer_size,
                  profile_train_size=args.profile_train_size,
                  log=lambda text: print(text, file=sys.stderr, flush=True), on_section=save)
    results.update(command=command, date=now(), machine=info)
    publish(results, to_markdown(results), args.out, "speed", args.write)
    if args.write:
        (args.out / "speed.partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":  # required: DataLoader workers may re-import this file
    sys.exit(main())
