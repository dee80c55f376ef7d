"""`tlese export BUNDLE --onnx`: a bundle's fold models as ONNX files for a team that deploys elsewhere, with a parity
report against the bundle's torch outputs on its reference cases.

The ONNX machinery itself (export_onnx, OnnxModel, session_options, check_onnx, quantize_onnx) lives with the bundle
format in `tlese.bundle.onnx` and is re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tlese.bundle.onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxModel,
    check_onnx,
    export_bundle_onnx,
    export_onnx,
    input_shape,
    onnx_file,
    quantize_onnx,
    session_options,
)

PARITY_FILE = "parity.json"
PARITY_KEYS = ("per_model", "raw", "calibrated")

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "PARITY_FILE", "OnnxModel", "check_onnx", "export_bundle",
           "export_bundle_onnx", "export_onnx", "input_shape", "quantize_onnx", "session_options"]


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def export_bundle(bundle: Any, out_dir: str | Path, threads: int | None = None) -> dict:
    """Write the fold models of `bundle` (a loaded Bundle) as `out_dir/onnx/fold_<k>.onnx` (the bundle's own
    verified files, or exported now when the bundle carries none) and `out_dir/parity.json`: the ensemble under ONNX
    Runtime against the bundle's torch outputs on its reference cases. Returns the report; "passed" is whether the
    max absolute difference is within the bundle tolerance (1e-4)."""
    import onnxruntime
    import torch

    from tlese.bundle.format import TOLERANCE, onnx_ensemble

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder; give --out a folder")
    carried = bundle.onnx_files()
    if carried:
        for fold, data in carried.items():
            target = out_dir / onnx_file(fold)
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_private(target, data)
        origin = "carried by the bundle (verified against its checksums)"
    else:
        export_bundle_onnx(bundle, out_dir)
        origin = "exported now from the bundle's weights (the bundle carries no ONNX files)"
    files = {fold: out_dir / onnx_file(fold) for fold in bundle.folds}
    predictor = onnx_ensemble(bundle, files, threads=threads)
    worst = dict.fromkeys(PARITY_KEYS, 0.0)
    cases = bundle.reference_cases()
    for _, x, _ in cases:
        want, got = bundle.predict_arrays(x[None]), predictor(x[None])
        for key in PARITY_KEYS:
            worst[key] = max(worst[key], float(np.abs(want[key] - got[key]).max()))
    difference = max(worst.values())
    report = {
        "bundle_sha256": bundle.sha256, "signed": bool(bundle.signed), "origin": origin,
        "files": [{"file": onnx_file(fold), "fold": fold, "input_shape": ["B", *bundle.input_shape],
                   "input": "float32 in [0, 1], the bundle's preprocessing applied"
                            + ("; views CC then MLO" if bundle.views == "dual" else ""),
                   "output": f"logits of classes {list(bundle.class_names)} (softmax, then the ensemble mean)"}
                  for fold in bundle.folds],
        "ensemble": {"raw": "mean of the fold models' softmax probabilities", "temperature": bundle.temperature,
                     "calibration": bundle.meta.get("calibration")},
        "reference_cases": len(cases), "compared": "probabilities (per model, raw mean, calibrated) of ONNX Runtime "
        "against the bundle's torch models", "max_abs_diff": difference, "max_abs_diff_by_output": worst,
        "tolerance": TOLERANCE, "passed": bool(difference <= TOLERANCE),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
    }
    (out_dir / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
