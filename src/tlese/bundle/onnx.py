"""ONNX export for offline CPU inference: a model from preprocessed input to logits, run with ONNX Runtime.

    from tlese.bundle.onnx import OnnxModel, check_onnx, export_onnx
    path = export_onnx(model, "exam.onnx", image_size=512, views="dual")   # (B, 2, 1, 512, 512) -> (B, classes)
    assert check_onnx(model, path, torch.rand(1, 2, 1, 512, 512)) < 1e-4
    logits = OnnxModel(path, threads=2)(exam)                              # exam: float32 in [0, 1]

The graph takes the preprocessed image (float32 in [0, 1], `(B, C, H, W)` or dual-view `(B, 2, C, H, W)` in CC,
MLO order) and normalises it itself, as the PyTorch model does. Batch is dynamic; height and width are fixed at
export (the TensorFlow-SAME padding of the Lite0 backbone then becomes constant pads that ONNX Runtime fuses into
the convolutions). Exporter: `torch.onnx.export(dynamo=True)` (torch.export): it folds BatchNorm into the convs and
gives constant pads; the TorchScript exporter traces `SamePad2d` into a Shape/Pad subgraph that ONNX Runtime cannot
fuse (tlese_lite0: ~1.3x slower, benchmarks/results/onnx.md). Weights are stored inside the one .onnx file.

A bundle carries one such file per fold model (`onnx/fold_<k>.onnx`, see `tlese.bundle.format.export_bundle_onnx` and
`Bundle.onnx_predictor`), and with `tlese bundle --int8` their `quantize_onnx` versions when those passed the
out-of-fold check (`onnx/fold_<k>.int8.onnx`, `tlese.train.int8`); this module knows models and files only, not
bundles.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"  # optional second output: pooled penultimate features per view (B, V, F)
VIEWS = ("single", "dual")
NUM_DUAL_VIEWS = 2
# How far outside [0, 1] an input may stray before OnnxModel refuses it (the PyTorch model's own tolerance).
INPUT_RANGE_TOLERANCE = 0.05


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(height), int(width)


def _resolve_views(model: nn.Module, views: str | None) -> str:
    own = {1: "single", NUM_DUAL_VIEWS: "dual"}.get(getattr(model, "num_views", 0))
    if views is None:
        if own is None:
            raise ValueError("views must be given ('single' or 'dual') for a model without `num_views`")
        return own
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    if own is not None and own != views:
        raise ValueError(f"views={views!r} but the model is a {own}-view model")
    return views


def input_shape(image_size: int | tuple[int, int], views: str, in_chans: int = 1, batch: int = 1) -> tuple[int, ...]:
    """The graph's input shape for one batch: `(B, C, H, W)` or `(B, 2, C, H, W)`."""
    height, width = _image_hw(image_size)
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    return (batch, NUM_DUAL_VIEWS, in_chans, height, width) if views == "dual" else (batch, in_chans, height, width)


class _WithFeatures(nn.Module):
    """The model's logits and its per-view penultimate features (`tlese.bundle.ood.feature_extractor`) as two
    outputs. The backbone appears twice in the exported graph; ONNX Runtime's common-subexpression elimination
    merges the copies (measured: the same optimised node count as the logits-only graph)."""

    def __init__(self, model: nn.Module) -> None:
        from tlese.bundle.ood import feature_extractor

        super().__init__()
        self.model = model
        self.extract = feature_extractor(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x), self.extract(x)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int | tuple[int, int] = 512,
    views: str | None = None,
    opset: int | None = None,
    *,
    dynamic_batch: bool = True,
    metadata: Mapping[str, str] | None = None,
    features: bool = False,
) -> Path:
    """Export `model` (preprocessed float32 input in [0, 1] -> logits) to one self-contained ONNX file at `path`.

    views: "single" -> input `(B, C, H, W)`, "dual" -> `(B, 2, C, H, W)`; None takes the model's own (`num_views`).
    image_size: H = W, or (H, W); fixed in the graph. opset: None = the exporter's default (>= 18).
    dynamic_batch: the batch axis is symbolic ("batch"); False fixes it at 1 (measured: no faster).
    features: also output the pooled penultimate features per view, "features" (B, V, F), after "logits" (what the
    bundle's out-of-distribution model scores). The model is exported from an eval-mode copy with the input range
    check off; `model` itself is untouched.
    The file's metadata records model name, views, input shape, classes and value range (`OnnxModel.metadata`),
    plus `metadata`. Returns the path.
    """
    import onnx

    path = Path(path)
    views = _resolve_views(model, views)
    in_chans = int(getattr(model, "in_chans", 1))
    net = copy.deepcopy(model).eval()
    if hasattr(net, "check_input"):
        net.check_input = False  # data-dependent (min/max to Python floats): not exportable, not wanted in a graph
    # Example batch 2, not 1: a dynamic dim whose example is 1 can be specialised to a constant by torch.export.
    batch = 2 if dynamic_batch else 1
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(input_shape(image_size, views, in_chans, batch), generator=generator)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, onnxscript notes), not about this model
        torch.onnx.export(
            _WithFeatures(net) if features else net, (example,), str(path), dynamo=True, external_data=False,
            verbose=False, optimize=True, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, FEATURES_NAME] if features else [OUTPUT_NAME], opset_version=opset,
            dynamic_shapes=dynamic_shapes,
        )  # fmt: skip
    proto = onnx.load(str(path))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    height, width = _image_hw(image_size)
    info = {
        "tlese.model": str(cfg.get("model", type(model).__name__)),
        "tlese.views": views,
        "tlese.input_shape": "x".join(str(d) for d in input_shape(image_size, views, in_chans, 1)[1:]),
        "tlese.image_size": f"{height}x{width}",
        "tlese.input_range": "0,1",
        "tlese.num_classes": str(getattr(model, "num_classes", "")),
        "tlese.fusion": str(getattr(model, "fusion", "")) if views == "dual" else "",
        "tlese.torch": torch.__version__,
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    del proto.metadata_props[:]
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


def session_options(threads: int | None = None, spinning: bool = True):
    """The ONNX Runtime session options OnnxModel uses: ORT_ENABLE_ALL, sequential, `threads` intra-op threads;
    `spinning=False`: idle intra-op threads sleep instead of busy-waiting between ops."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # incl. the NCHWc layout: ~2x
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = 0 if threads is None else int(threads)  # 0: ONNX Runtime's default (all cores)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxModel:
    """An exported model under ONNX Runtime (CPUExecutionProvider, graph optimisation ORT_ENABLE_ALL).

    `OnnxModel(path, threads=2)(x)` -> logits `(B, num_classes)` as float32 numpy; `path` may also be the file's
    bytes (then `name` names it in messages). `x`: float in [0, 1] of the exported shape (`input_shape`, batch
    free); checked unless `check_input=False`. `threads`: intra-op threads
    (None: ONNX Runtime's default, one per physical core). `spinning`: ONNX Runtime's busy-waiting intra-op threads
    (its default); turn off on a machine whose cores other work is using (benchmarks/results/onnx.md).
    """

    def __init__(
        self, path: str | os.PathLike | bytes, threads: int | None = None, check_input: bool = True,
        spinning: bool = True, name: str | None = None,
    ) -> None:
        import onnxruntime as ort

        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        in_memory = isinstance(path, (bytes, bytearray, memoryview))
        self.path = Path(name or "model.onnx") if in_memory else Path(path)
        if not in_memory and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        self.threads = threads
        self.check_input = check_input
        options = session_options(threads, spinning)
        model = bytes(path) if in_memory else str(self.path)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        # (None, 2, 1, 512, 512): None where the axis is symbolic (the batch)
        self.input_shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, threads={self.threads}, input_shape={self.input_shape})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x, [self.output_name])[0]

    def run(self, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """The named outputs (default: all, `output_names`) for input `x`, checked as by `__call__`."""
        x = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        expected = self.input_shape
        if x.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
            shown = tuple("B" if e is None else e for e in expected)
            raise ValueError(f"{self.path.name}: expected input {shown}, got {x.shape}")
        if self.check_input and x.size:
            low, high = float(x.min()), float(x.max())
            if not (low >= -INPUT_RANGE_TOLERANCE and high <= 1.0 + INPUT_RANGE_TOLERANCE):  # also catches NaN
                raise ValueError(
                    f"model input must be float in [0, 1] (the model normalises itself); observed min {low:.4g}, "
                    f"max {high:.4g}"
                )
        return self.session.run(outputs or self.output_names, {self.input_name: x})


def check_onnx(model: nn.Module, path: str | os.PathLike | OnnxModel, inputs: torch.Tensor | np.ndarray) -> float:
    """Max |logit difference| between `model` (PyTorch, eval mode) and the exported file under ONNX Runtime on
    `inputs` (float in [0, 1], the exported shape). The model's train/eval mode is restored afterwards."""
    onnx_model = path if isinstance(path, OnnxModel) else OnnxModel(path)
    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32) if isinstance(inputs, np.ndarray) else inputs).float()
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            expected = model(x.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    got = onnx_model(x.numpy())
    if got.shape != expected.shape:
        raise ValueError(f"ONNX output {got.shape} != PyTorch output {expected.shape}")
    return float(np.max(np.abs(got - expected))) if got.size else 0.0


def quantize_onnx(
    path: str | os.PathLike,
    out: str | os.PathLike,
    calibration: Iterable[np.ndarray],
    per_channel: bool = True,
) -> Path:
    """Static int8 post-training quantisation (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges
    from `calibration` batches of the input shape) of an exported file, with onnxruntime.quantization.

    NOT a drop-in replacement: ~2x faster on a VNNI CPU but it changes the outputs (benchmarks/results/onnx.md).
    Validate on a held-out set before use: a bundle offers int8 files only when its out-of-fold check passed
    (`tlese.train.int8`). The same file and calibration batches give the same bytes.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batches = iter(calibration)

    class _Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {name: np.ascontiguousarray(batch, dtype=np.float32)}

    prepared = out.with_name(out.stem + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root.setLevel(logging.ERROR)  # onnxruntime.quantization logs per-tensor notes on the root logger
            # ORT_ENABLE_BASIC (hardware-independent: constant folding, BatchNorm folded into its Conv) and shape
            # inference. Without the folding each Conv's output would be quantised before its BatchNorm, per tensor,
            # across channels of very different ranges; the NCHWc layout is a later level, never saved here.
            quant_pre_process(str(path), str(prepared), skip_optimization=False, skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# A bundle's fold models as ONNX files (read from the folder's own records: this module does not load bundles)

ONNX_DIR = "onnx"
DEFAULT_TOLERANCE = 1e-4


def onnx_file(fold: int) -> str:
    """Where a bundle keeps the ONNX file of fold `fold`."""
    return f"{ONNX_DIR}/fold_{int(fold)}.onnx"


def int8_file(fold: int) -> str:
    """Where a bundle keeps the int8 ONNX file of fold `fold` (only when its int8 check passed, `tlese.train.int8`)."""
    return f"{ONNX_DIR}/fold_{int(fold)}.int8.onnx"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 (as the bundle combines its models)."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(shifted - shifted.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _folder_models(folder: Path) -> tuple[list[nn.Module], list[int], str, int, list[np.ndarray], float]:
    """(models, folds, views, image size, reference inputs, tolerance) of a bundle folder, from model.json, the
    weights and reference/expected.json as they stand (the maker's unsigned work folder: no checksum check here)."""
    import json

    from safetensors.torch import load_file

    from tlese.models import create_model

    meta = json.loads((folder / "model.json").read_text())
    spec = meta.get("model_spec") or meta["model"]
    models, folds = [], []
    for entry in meta["weights"]:
        model = create_model(spec["registry_name"], pretrained=False, **spec["create_kwargs"])
        model.load_state_dict(load_file(str(folder / entry["file"])), strict=True)
        models.append(model.eval())
        folds.append(int(entry["fold"]))
    reference = meta.get("reference") or {}
    expected = json.loads((folder / reference.get("file", "reference/expected.json")).read_text())
    inputs = [np.load(folder / item["file"], allow_pickle=False) for item in expected["references"]]
    tolerance = float(reference.get("tolerance", expected.get("tolerance", DEFAULT_TOLERANCE)))
    return models, folds, meta["views"], int(meta["input"]["image_size"]), inputs, tolerance


def export_bundle_onnx(
    source, out_dir: str | os.PathLike | None = None, *, folds: Iterable[int] | None = None,
    views: str | None = None, image_size: int | None = None, references: Iterable[np.ndarray] | None = None,
    tolerance: float = DEFAULT_TOLERANCE, opset: int | None = None,
) -> list[dict]:
    """Export each fold model to `out_dir/onnx/fold_<k>.onnx` (outputs "logits" and "features", the latter for the
    bundle's OOD model); return the model.json "onnx" entries `{"file", "fold", "sha256", "outputs",
    "max_abs_diff", "max_abs_logit_diff", "max_abs_feature_diff", "within_tolerance"}`, parity measured against the
    torch model on the reference inputs (max_abs_diff: max |softmax probability difference|; the caller refuses a
    file beyond the bundle's tolerance, 1e-4).

    source: a bundle folder (model.json, weights and reference inputs read as they stand, so the maker can call this
    on its work folder before signing; `out_dir` defaults to it), a loaded Bundle, or the fold models themselves
    (then `views` and `image_size` are needed; `folds` default 0..M-1, `references` default: none, give some).
    """
    import hashlib

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        out_dir = folder if out_dir is None else out_dir
        models, folds, views, image_size, references, tolerance = _folder_models(folder)
    elif hasattr(source, "reference_cases"):  # a loaded Bundle
        models, folds, views, image_size = source.models, source.folds, source.views, source.image_size
        references = [x for _, x, _ in source.reference_cases()] if references is None else references
    else:
        models = list(source)
        folds = range(len(models)) if folds is None else folds
    folds, references = [int(fold) for fold in folds], list(references or [])
    if out_dir is None or views is None or image_size is None or not references:
        raise ValueError("export_bundle_onnx: give out_dir, views, image_size and reference inputs with a list of "
                         "models")
    if len(folds) != len(models):
        raise ValueError(f"export_bundle_onnx: {len(models)} models for folds {folds}")
    x = np.stack([np.asarray(item, dtype=np.float32) for item in references])
    entries = []
    for fold, model in zip(folds, models):
        name = onnx_file(fold)
        path = export_onnx(model, Path(out_dir) / name, image_size=int(image_size), views=views, opset=opset,
                           metadata={"tlese.fold": str(fold)}, features=True)
        with torch.inference_mode():
            expected, expected_features = (value.double().numpy() for value in _WithFeatures(model.eval())(
                torch.from_numpy(x)))
        got, got_features = (value.astype(np.float64) for value in OnnxModel(path, threads=1, check_input=False).run(x))
        difference = float(np.abs(softmax(got) - softmax(expected)).max())
        entries.append({"file": name, "fold": fold, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "outputs": [OUTPUT_NAME, FEATURES_NAME], "max_abs_diff": difference,
                        "max_abs_logit_diff": float(np.abs(got - expected).max()),
                        "max_abs_feature_diff": float(np.abs(got_features - expected_features).max()),
                        "within_tolerance": bool(difference <= tolerance)})
    return entries
