"""Model cost: parameters and FLOPs (torch's own counter), as rows and as a markdown/CSV table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tlese.models.blocks import ese_modules
from tlese.models.registry import create_model, get_entry, list_models


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def ese_parameter_count(model: nn.Module) -> int:
    """Parameters in the model's ESE gates (found by type, see `blocks.ese_modules`)."""
    return sum(p.numel() for _, ese in ese_modules(model) for p in ese.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass as `torch.utils.flop_counter` counts them: convolutions and matmuls only,
    one multiply-add = 2 FLOPs. Runs on the model's device; a model on the meta device costs no compute."""
    param = next(model.parameters())
    x = torch.zeros(tuple(input_shape), device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def model_table(
    names: Sequence[str] | None = None,
    sizes: Sequence[int] = (224, 512),
    num_classes: int = 4,
    in_chans: int = 1,
    views: str = "single",
) -> list[dict]:
    """One row per model: params (total, % added by ESE) and GFLOPs for a batch of one at each square input size.

    Models are built on the meta device, so even ResNet-50 at 512 px costs nothing to measure.
    """
    rows = []
    for name in names or list_models():
        with torch.device("meta"):
            model = create_model(name, num_classes, in_chans=in_chans, views=views).eval()
        model.check_input = False
        ese = ese_parameter_count(model)
        params = count_params(model)
        # ESE share as params added over the same network without ESE
        row = {"model": name, "params_M": params / 1e6, "ese_added_%": 100.0 * ese / (params - ese)}
        for size in sizes:
            shape = (1, in_chans, size, size) if views == "single" else (1, 2, in_chans, size, size)
            row[f"GFLOPs@{size}"] = count_flops(model, shape) / 1e9
        row["description"] = get_entry(name).description
        rows.append(row)
    return rows


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict], fmt: str = "md") -> str:
    """`md` (a GitHub markdown table) or `csv`."""
    if not rows:
        return ""
    columns = list(rows[0])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        return out.getvalue()
    if fmt != "md":
        raise ValueError(f"table format must be 'md' or 'csv', got {fmt!r}")
    align = ["---:" if isinstance(rows[0][k], (int, float)) else "---" for k in columns]  # numbers right-aligned
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(row[k]) for k in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
