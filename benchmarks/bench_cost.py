"""Model cost: parameters, FLOPs (torch's counter) and training memory for every registered model.

Params and FLOPs come from `tlese.models.cost.model_table` (meta device, batch 1, conv + matmul FLOPs, one
multiply-add = 2). Memory: the activations autograd saves for backward in one training-mode forward of a real
image (batch 2, halved; `saved_tensors_hooks`, distinct storages, parameters excluded), plus 16 bytes per parameter
(fp32 weight, gradient, AdamW's two moments) for the training total at batch 16.

    .venv/bin/python benchmarks/bench_cost.py --write
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, build, command_line, header, machine, now, publish, saved_activation_bytes  # noqa: E402

BYTES_PER_PARAM_TRAIN = 16  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
TRAIN_BATCH = 16
PARAM_GOAL_M = 4.0
ESE_PARAM_GOAL = 10.0  # % over the plain backbone
ESE_FLOP_GOAL = 5.0


def plain_of(name: str) -> str | None:
    for backbone in ("mbv2", "lite0"):
        if name.startswith(f"tlese_{backbone}"):
            return f"{backbone}_plain"
    return None


def run(models: Sequence[str] | None = None, sizes: Sequence[int] = (224, 512), memory: bool = True) -> dict:
    from tlese.models import list_models
    from tlese.models.cost import model_table

    models = list(models or list_models())
    rows = {row["model"]: row for row in model_table(models, sizes=sizes)}
    out: dict = {"sizes": list(sizes), "train_batch": TRAIN_BATCH, "models": {}}
    for name in models:
        row = rows[name]
        entry = {"params_M": round(row["params_M"], 3), "ese_params_added_%": round(row["ese_added_%"], 2)}
        for size in sizes:
            entry[f"GFLOPs@{size}"] = round(row[f"GFLOPs@{size}"], 3)
        plain = plain_of(name)
        if plain in rows:
            for size in sizes:
                base = rows[plain][f"GFLOPs@{size}"]
                entry[f"ese_flops_added_%@{size}"] = round(100 * (row[f"GFLOPs@{size}"] - base) / base, 3)
        if memory:
            torch.manual_seed(0)
            model = build(name, train=True)
            params = sum(p.numel() for p in model.parameters())
            for size in sizes:
                act = saved_activation_bytes(model, torch.rand(2, 1, size, size)) / 2  # batch 2: BN needs > 1 value
                entry[f"act_MB_per_img@{size}"] = round(act / 2**20, 1)
                entry[f"train_GB_b{TRAIN_BATCH}@{size}"] = round(
                    (TRAIN_BATCH * act + BYTES_PER_PARAM_TRAIN * params) / 2**30, 2)
            del model
        out["models"][name] = entry
    return out


def to_markdown(results: dict) -> str:
    sizes = results["sizes"]
    rows = results["models"]
    mem = any(f"act_MB_per_img@{sizes[0]}" in r for r in rows.values())
    cols = ["params_M", "ese_params_added_%"] + [f"GFLOPs@{s}" for s in sizes] \
        + [f"ese_flops_added_%@{s}" for s in sizes]
    if mem:
        cols += [f"act_MB_per_img@{s}" for s in sizes] + [f"train_GB_b{results['train_batch']}@{s}" for s in sizes]
    lines = header("Model cost: parameters, FLOPs, training memory", results)
    lines += [
        "4-class head, `in_chans=1`, single view. GFLOPs: `torch.utils.flop_counter` (convs + matmuls, multiply-add "
        "= 2 FLOPs, batch 1; pooling and the ESE scaling are not counted, they add 0.1-0.2 % per docs/models.md). "
        "`ese_*_added_%`: over the same backbone without ESE (`mbv2_plain` / `lite0_plain`).",
        "",
        "Memory method: `act_MB_per_img` = bytes of the distinct tensors autograd saves for backward in one "
        "training-mode forward of a batch of 2, per image (`torch.autograd.graph.saved_tensors_hooks`, parameters "
        "excluded): the activation memory held at the training peak, linear in the batch. "
        f"`train_GB_b{results['train_batch']}` = batch x that + 16 B/param (fp32 weights, gradients, AdamW moments). "
        "Allocator overhead, transient workspaces and the backward's temporaries are not included; inference "
        "(no saved tensors) needs far less. Measured on CPU, fp32; the numbers are device-independent.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    lines += ["", "Goals:", ""]
    for name in ("tlese_mbv2", "tlese_lite0"):
        if name not in rows:
            continue
        r = rows[name]
        ok_p = r["params_M"] <= PARAM_GOAL_M
        ok_e = r["ese_params_added_%"] <= ESE_PARAM_GOAL
        flops = [r[k] for k in r if k.startswith("ese_flops_added_%")]
        ok_f = all(f <= ESE_FLOP_GOAL for f in flops)
        lines.append(f"- {name}: {r['params_M']} M params ({'meets' if ok_p else 'misses'} <= {PARAM_GOAL_M} M); "
                     f"ESE +{r['ese_params_added_%']} % params ({'meets' if ok_e else 'misses'} <= {ESE_PARAM_GOAL} %)"
                     + (f", +{max(flops)} % counted FLOPs ({'meets' if ok_f else 'misses'} <= {ESE_FLOP_GOAL} %)"
                        if flops else "") + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--no-memory", action="store_true", help="skip the (real-compute) memory measurement")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/cost.md and .json")
    parser.add_argument("--out", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = command_line("bench_cost.py", argv)
    info = machine()
    results = run(args.models, args.sizes, memory=not args.no_memory)
    results.update(command=command, date=now(), machine=info)
    publish(results, to_markdown(results), args.out, "cost", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
