"""How cost grows with the input size (224, 384, 512, 768): TLese against ResNet-50 (and DenseNet-121).

Per model and size: GFLOPs (torch's counter, batch 1), training activation memory per image (saved-for-backward
tensors, see bench_cost.py) and CPU inference latency at batch 1 (NCHW, `inference_mode`, all models interleaved
per repetition, median). Writes a Markdown table, JSON and a PNG plot.

    .venv/bin/python benchmarks/bench_scaling.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

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
    saved_activation_bytes,
    summarise,
)

MODELS = ("tlese_mbv2", "tlese_lite0", "resnet50", "densenet121")
SIZES = (224, 384, 512, 768)


def run(models: Sequence[str] = MODELS, sizes: Sequence[int] = SIZES, reps: int = 3, warmup: int = 2) -> dict:
    from tlese.models.cost import count_flops

    out: dict = {"sizes": list(sizes), "reps": reps, "threads": torch.get_num_threads(), "models": {}}
    built = {}
    for name in models:
        torch.manual_seed(0)
        built[name] = build(name)
        out["models"][name] = {"GFLOPs": [], "act_MB_per_img": [], "latency_ms": [], "latency_ms_range": []}
    for size in sizes:
        for name, model in built.items():
            with torch.device("meta"):
                meta = build(name)
            out["models"][name]["GFLOPs"].append(round(count_flops(meta, (1, 1, size, size)) / 1e9, 3))
            act = saved_activation_bytes(model, torch.rand(2, 1, size, size)) / 2
            out["models"][name]["act_MB_per_img"].append(round(act / 2**20, 1))
            model.eval()
        x = torch.rand(1, 1, size, size)

        def step(model, x=x):
            def call():
                with torch.inference_mode():
                    model(x)
            return call

        rows = summarise(interleaved({n: step(m) for n, m in built.items()}, reps, warmup=warmup), 1,
                         baselines=("resnet50",))
        for name, row in rows.items():
            seconds = [1000 / row["img_s_max"], 1000 / row["img_s_min"]]
            out["models"][name]["latency_ms"].append(row["ms_median"])
            out["models"][name]["latency_ms_range"].append([round(s, 1) for s in seconds])
            if "x_resnet50" in row:
                out["models"][name].setdefault("x_resnet50", []).append(row["x_resnet50"])
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    panels = [("GFLOPs", "GFLOPs (batch 1)"), ("act_MB_per_img", "training activations, MB / image"),
              ("latency_ms", "CPU inference latency, ms (batch 1)"), ("x_resnet50", "speed over ResNet-50 (x)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for index, (name, row) in enumerate(results["models"].items()):
            if key in row and not (key == "x_resnet50" and name == "resnet50"):
                ax.plot(sizes, row[key], marker="o", label=name, color=f"C{index}")  # same colour in every panel
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("input size (px, square)")
        ax.set_xticks(sizes)
        if key != "x_resnet50":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Cost vs input size ({results['machine']['cpu']}, {results['threads']} thread(s), "
                 f"{results['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(results: dict, plot_name: str | None = None) -> str:
    sizes = results["sizes"]
    lines = header("Cost vs input size", results)
    lines += [f"Batch 1, NCHW, {results['threads']} torch thread(s), {results['reps']} interleaved repetitions "
              "(latency: median). GFLOPs: torch's counter; activations: saved-for-backward tensors per image "
              "(training memory, see cost.md).", ""]
    if plot_name:
        lines += [f"![cost vs size]({plot_name})", ""]
    lines += ["| model | metric | " + " | ".join(str(s) for s in sizes) + " |", "|---|---|" + "---:|" * len(sizes)]
    for name, row in results["models"].items():
        for key in ("GFLOPs", "act_MB_per_img", "latency_ms", "x_resnet50"):
            if key in row:
                lines.append(f"| {name} | {key} | " + " | ".join(str(v) for v in row[key]) + " |")
    base = results["models"].get("resnet50")
    if base:
        lines += ["", "Growth from the smallest to the largest size (x):", ""]
        for name, row in results["models"].items():
            growth = {k: row[k][-1] / row[k][0] for k in ("GFLOPs", "act_MB_per_img", "latency_ms") if row[k][0]}
            lines.append(f"- {name}: " + ", ".join(f"{k} x{v:.1f}" for k, v in growth.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see README)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/scaling.md, .json, .png")
    parser.add_argument("--out", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = command_line("bench_scaling.py", argv)
    torch.set_num_threads(args.threads)
    info = machine()
    results = run(args.models, args.sizes, args.reps)
    results.update(command=command, date=now(), machine=info)
    if args.write:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(results, args.out / "scaling.png")
        (args.out / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "scaling.md").write_text(to_markdown(results, "scaling.png"))
    print(to_markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
