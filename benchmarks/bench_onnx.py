"""ONNX Runtime against PyTorch eager on the CPU, per exam: one dual-view call (CC + MLO, batch 1, 512 x 512).

What a hospital workstation runs offline: the model exported with `tlese.bundle.onnx.export_onnx` (views="dual",
dynamic batch), run by `OnnxModel` (CPUExecutionProvider, ORT_ENABLE_ALL, `--threads` intra-op threads), against
the same model in PyTorch eager (`inference_mode`, eval, NCHW, `--threads` torch threads). Random init, 4 classes,
1 channel: speed does not depend on the weights (checked: no denormal slow-down; int8's accuracy is measured
apart).

Protocol: every model is built and exported once; the ONNX Runtime sessions are timed interleaved round-robin
(`--ort-reps` repetitions, 2 warm-up calls each, an untimed pause before every call: see `paused_interleaved`),
then the eager models likewise (`--eager-reps`, the parity call + 1 warm-up). Reported per row: best-of-N and
median ms per exam, the speed ratio over ResNet-50 paired per repetition (median, min-max) in the same group.
Extra ONNX Runtime rows:

- `view-parallel`: the single-view graph of the same weights, CC and MLO run concurrently on two 1-thread sessions
  (logits averaged: exactly the "mean_logits" fusion), against one session with 2 intra-op threads.
- `int8`: static post-training quantisation (`quantize_onnx`, as `tlese bundle --int8` does) of the default model,
  calibrated on prepared mini-MIAS exams when ../shared/data is there (else on uniform noise, said in the results).
- int8 on real mammograms (`--only int8` runs just this, in a few minutes, and adds it to the written results):
  ImageNet-initialised tlese_lite0 with a linear probe of breast density fitted on the calibration exams' fp32
  features, exported as bundles export (logits + features), quantised on 32 prepared mini-MIAS exams, compared
  with fp32 on 64 exams of other women (features, probabilities, predicted class, density AUC) and timed against
  fp32 in the same run; also the quantisation without BatchNorm folding (how `quantize_onnx` worked before).
- variants of the default model (off with `--no-variants`): graph level ORT_ENABLE_EXTENDED (no NCHWc layout), no
  thread spinning, a static-batch export, the TorchScript exporter (`dynamo=False`), symmetric instead of TF-SAME
  padding (a model change, measured only).

    .venv/bin/python benchmarks/bench_onnx.py --write
    .venv/bin/python benchmarks/bench_onnx.py --only int8 --write
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, command_line, header, interleaved, machine, now, publish, summarise  # noqa: E402

MODELS = ("tlese_mbv2", "tlese_lite0", "resnet50", "densenet121")
TLESE = ("tlese_mbv2", "tlese_lite0")
DEFAULT_MODEL = "tlese_lite0"  # the default TLese model (issue: the auxiliary tool)
BASELINE = "resnet50"
GOAL_MS = 40.0  # ONNX Runtime ms per exam, default model
GOAL_X = 5.0  # ... and at least this many times ResNet-50's speed, same run
PACKAGES = ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "onnxscript")
SHARED_MIAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"
INT8_CALIBRATION_EXAMS = 32
INT8_EVAL_EXAMS = 64
# L2 strength of the density probe: 32 exams in 1280 dimensions separate perfectly, and an unregularised probe's huge
# logits would turn any feature change into a probability flip; this keeps its logits at a trained model's scale.
PROBE_C = 0.01


def build_dual(name: str, **kw) -> torch.nn.Module:
    from tlese.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=1, views="dual", **kw)
    model.check_input = False
    return model.eval()


def single_of(dual: torch.nn.Module) -> torch.nn.Module:
    """The single-view classifier with the dual model's weights (same state-dict names)."""
    from tlese.models.classifier import ImageClassifier

    single = ImageClassifier(dual.backbone, dual.num_classes, dual.pretrained_cfg)
    single.head = dual.head
    single.check_input = False
    return single.eval()


class ViewParallel:
    """CC and MLO on two single-thread sessions of the single-view graph at once; logits averaged."""

    def __init__(self, path: Path) -> None:
        from tlese.bundle.onnx import OnnxModel

        self.sessions = [OnnxModel(path, threads=1, check_input=False) for _ in range(2)]
        self.pool = ThreadPoolExecutor(max_workers=1)

    def __call__(self, exam: np.ndarray) -> np.ndarray:
        other = self.pool.submit(self.sessions[1], exam[:, 1])
        return (self.sessions[0](exam[:, 0]) + other.result()) / 2


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _torchscript_export(model: torch.nn.Module, path: Path, size: int) -> Path:
    with _quiet():
        torch.onnx.export(model, (torch.rand(1, 2, 1, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _symmetric_lite0(size: int) -> torch.nn.Module:
    """tlese_lite0 with symmetric instead of TF-SAME padding (the potential of that model change; not shipped)."""
    from tlese.models.tlese_resnet import LITE0, TLeseBackbone

    model = build_dual("tlese_lite0")
    torch.manual_seed(0)
    model.backbone = TLeseBackbone(dataclasses.replace(LITE0, padding="symmetric"), in_chans=1).eval()
    return model


def mias_exams(size: int, n_calib: int = INT8_CALIBRATION_EXAMS, n_eval: int = INT8_EVAL_EXAMS, log=print
               ) -> dict | None:
    """Prepared mini-MIAS exams: the images read by the "mias" adapter and prepared by `prepare_file` with
    `PreprocessParams.build(size)`, each one an exam with the image in both view slots (MIAS films are MLO only: the
    bundle's "duplicate" policy for a breast lacking a view). Women drawn in a seeded order: the first give
    `n_calib` calibration exams, the next `n_eval` held-out exams. {"calib", "eval": (N, 2, 1, size, size),
    "calib_tissue", "eval_tissue": labels F/G/D, "seconds": preparation time}; None without ../shared/data."""
    from tlese.data.datasets import get_adapter
    from tlese.data.preprocess import PreprocessParams, prepare_file

    if not (SHARED_MIAS / "labels.csv").is_file():
        return None
    table = get_adapter("mias")(SHARED_MIAS)
    patients = np.random.default_rng(0).permutation(sorted(table["patient_id"].unique()))
    params, started, chosen = PreprocessParams.build(size), time.perf_counter(), {}
    for name, wanted in (("calib", n_calib), ("eval", n_eval)):
        rows = []
        while len(rows) < wanted:
            patient, patients = patients[0], patients[1:]
            rows += [row for _, row in table[table["patient_id"] == patient].iterrows()][: wanted - len(rows)]
        images = [prepare_file(row["path"], row["side"], None, params)[0] for row in rows]
        chosen[name] = np.stack([np.stack([image, image])[:, None] for image in images]).astype(np.float32)
        chosen[f"{name}_tissue"] = [str(row["tissue"]) for row in rows]
    chosen["seconds"] = round(time.perf_counter() - started, 1)
    log(f"prepared {n_calib} + {n_eval} mini-MIAS exams at {size} px in {chosen['seconds']} s")
    return chosen


def _quantize_unfolded(path: Path, out: Path, calibration) -> Path:
    """`quantize_onnx` as it was before #21: shape inference only (skip_optimization=True), so each Conv's output
    is quantised before its BatchNorm."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter(calibration)

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {"image": batch}

    prepared = out.with_name(out.stem + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization's per-tensor notes
    try:
        with _quiet():
            quant_pre_process(str(path), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    return out


def _probe_head(model: torch.nn.Module, features: np.ndarray, labels: list[str]) -> list[str]:
    """Set the model's head to a logistic-regression probe of `labels` on `features` (standardised inside the
    probe, folded into the head's weights); returns the class order."""
    from sklearn.linear_model import LogisticRegression

    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    probe = LogisticRegression(C=PROBE_C, max_iter=5000).fit((features - mean) / std, labels)
    weight = probe.coef_ / std
    bias = probe.intercept_ - weight @ mean
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight).float())
        model.head.bias.copy_(torch.from_numpy(bias).float())
    return [str(name) for name in probe.classes_]


def int8_real(size: int, workdir: Path, threads: int = 2, reps: int = 20, pause: float = 0.1, log=print
              ) -> dict | None:
    """int8 against fp32 on prepared mini-MIAS exams (see the module docstring); None without the data or the
    Lite0 ImageNet weights."""
    from tlese.bundle.onnx import FEATURES_NAME, OUTPUT_NAME, OnnxModel, export_onnx, quantize_onnx, softmax
    from tlese.evaluate.metrics import classification_metrics

    exams = mias_exams(size, log=log)
    if exams is None:
        log("int8 on mini-MIAS: skipped (no ../shared/data/mini-mias)")
        return None
    try:
        model = build_dual("tlese_lite0", pretrained=True)
    except Exception as error:  # weights not available offline
        log(f"int8 on mini-MIAS: skipped ({type(error).__name__}: no Lite0 ImageNet weights)")
        return None
    calib, held_out = exams["calib"], exams["eval"]
    model.head = torch.nn.Linear(model.num_features, 3)
    fp32_path = export_onnx(model, workdir / "lite0_probe.onnx", size, "dual", features=True)
    base = OnnxModel(fp32_path, threads=threads)
    train_features = np.concatenate([base.run(calib[i:i + 8])[1][:, 0] for i in range(0, len(calib), 8)])
    classes = _probe_head(model, train_features, exams["calib_tissue"])
    fp32_path = export_onnx(model, workdir / "lite0_probe.onnx", size, "dual", features=True)
    started = time.perf_counter()
    files = {"int8": quantize_onnx(fp32_path, workdir / "lite0_probe.int8.onnx",
                                   (calib[i:i + 8] for i in range(0, len(calib), 8)))}
    quantise_s = round(time.perf_counter() - started, 1)
    files["int8, BatchNorm not folded"] = _quantize_unfolded(fp32_path, workdir / "lite0_probe.unfolded.onnx",
                                                             (calib[i:i + 8] for i in range(0, len(calib), 8)))
    sessions = {"fp32": OnnxModel(fp32_path, threads=threads),
                **{name: OnnxModel(path, threads=threads) for name, path in files.items()}}
    outputs = {name: [session.run(held_out[i:i + 1], [OUTPUT_NAME, FEATURES_NAME]) for i in range(len(held_out))]
               for name, session in sessions.items()}
    targets = np.array([classes.index(label) for label in exams["eval_tissue"]])
    fp32_probs = softmax(np.concatenate([logits for logits, _ in outputs["fp32"]]))
    fp32_auc = classification_metrics(targets, fp32_probs, classes)["macro_auc"]
    centre = np.mean([features[0, 0] for _, features in outputs["fp32"]], axis=0, dtype=np.float64)
    variants = {}
    for name in files:
        cosine, rel, spread = [], [], []
        for (_, a), (_, b) in zip(outputs["fp32"], outputs[name]):
            fa, fb = a[0, 0].astype(np.float64), b[0, 0].astype(np.float64)
            cosine.append(float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))))
            rel.append(float(np.linalg.norm(fa - fb) / np.linalg.norm(fa)))
            spread.append(float(np.linalg.norm(fa - fb) / np.linalg.norm(fa - centre)))
        probs = softmax(np.concatenate([logits for logits, _ in outputs[name]]))
        change = np.abs(probs - fp32_probs)
        variants[name] = {
            "file_MB": round(files[name].stat().st_size / 2**20, 1),
            "feature_rel_l2_median": round(statistics.median(rel), 4), "feature_rel_l2_max": round(max(rel), 4),
            "feature_cosine_median": round(statistics.median(cosine), 4), "feature_cosine_min": round(min(cosine), 4),
            "feature_change_over_spread_median": round(statistics.median(spread), 4),
            "max_abs_prob_change": round(float(change.max()), 4),
            "mean_abs_prob_change": round(float(change.mean()), 4),
            "predicted_class_changed": round(float(np.mean(probs.argmax(1) != fp32_probs.argmax(1))), 4),
            "macro_auc": round(classification_metrics(targets, probs, classes)["macro_auc"], 4),
        }
    log(f"timing fp32 vs int8 on one prepared exam: {', '.join(sessions)}")
    exam = held_out[:1]
    steps = {name: (lambda session=session: session.run(exam)) for name, session in sessions.items()}
    times = paused_interleaved(steps, reps, warmup=2, pause=pause)
    latency = {name: {"ms_best": round(1000 * min(seconds), 1),
                      "ms_median": round(1000 * statistics.median(seconds), 1)} for name, seconds in times.items()}
    return {"size": size, "threads": threads, "reps": reps, "calibration_exams": len(calib),
            "eval_exams": len(held_out), "prepare_s": exams["seconds"], "quantise_s": quantise_s,
            "weights": "tlese_lite0 backbone: ImageNet (Lite0 weights package); head: logistic-regression probe of "
                       f"density (mini-MIAS tissue F/G/D, C={PROBE_C}) fitted on the calibration exams' fp32 features",
            "classes": classes, "fp32_macro_auc": round(fp32_auc, 4), "fp32_file_MB": round(
                fp32_path.stat().st_size / 2**20, 1), "variants": variants, "latency": latency}


def paused_interleaved(steps: dict[str, Callable[[], object]], reps: int, warmup: int, pause: float) -> dict:
    """`bench_common.interleaved` with `pause` seconds (untimed) before every call: ONNX Runtime's intra-op threads
    spin for a while after each run, so back to back a session's cores are still busy with the previous session's
    spinning threads."""
    return interleaved(steps, reps, warmup=warmup, pause=pause)


def _rows(times: dict[str, list[float]]) -> dict:
    rows = summarise(times, batch=1, baselines=(BASELINE,))
    for name, seconds in times.items():
        rows[name]["ms_best"] = round(1000 * min(seconds), 1)
        rows[name]["ms_median"] = round(1000 * statistics.median(seconds), 1)
    return rows


def run(
    models: Sequence[str] = MODELS,
    size: int = 512,
    threads: int = 2,
    ort_reps: int = 10,
    eager_reps: int = 3,
    view_parallel: Sequence[str] = TLESE,
    int8: bool = True,
    drift: bool = True,
    variants: bool = True,
    pause: float = 0.1,
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    from tlese.bundle.onnx import OnnxModel, export_onnx, quantize_onnx

    torch.set_num_threads(threads)
    scratch = tempfile.TemporaryDirectory(prefix="bench_onnx_") if workdir is None else None
    work = Path(scratch.name) if scratch else Path(workdir)
    exam = np.random.default_rng(0).random((1, 2, 1, size, size), dtype=np.float32)
    exam_t = torch.from_numpy(exam)
    results: dict = {"models": list(models), "size": size, "threads": threads, "export": {}, "protocol": {
        "ort_reps": ort_reps, "eager_reps": eager_reps, "ort_warmup": 2, "ort_pause_s": pause,
        "eager_warmup": "parity call + 1",
        "input": f"(1, 2, 1, {size}, {size}) float32 in [0, 1]"}}
    eager, ort_steps, extra = {}, {}, {}
    try:
        for name in models:
            model = build_dual(name)
            start = time.perf_counter()
            path = export_onnx(model, work / f"{name}.onnx", size, "dual")
            seconds = time.perf_counter() - start
            session = OnnxModel(path, threads=threads, check_input=False)
            with torch.inference_mode():
                reference = model(exam_t).numpy()  # also the first eager warm-up
            results["export"][name] = {"export_s": round(seconds, 1), "file_MB": round(path.stat().st_size / 2**20, 1),
                                       "max_abs_diff": float(np.abs(session(exam) - reference).max())}
            log(f"exported {name}: {results['export'][name]}")
            ort_steps[name] = lambda session=session: session(exam)

            def eager_step(model=model):
                with torch.inference_mode():
                    model(exam_t)

            eager[name] = eager_step
            if name in view_parallel:
                single = export_onnx(single_of(model), work / f"{name}.single.onnx", size, "single")
                parallel = ViewParallel(single)
                extra[f"{name} view-parallel"] = float(np.abs(parallel(exam) - reference).max())
                ort_steps[f"{name} view-parallel"] = lambda parallel=parallel: parallel(exam)
            if int8 and name == DEFAULT_MODEL:
                real = mias_exams(size, n_calib=8, n_eval=0, log=log) if drift else None
                if real is None:
                    rng = np.random.default_rng(1)
                    calibration = [rng.random(exam.shape, dtype=np.float32) for _ in range(2)]
                    results["int8_calibration"] = "2 uniform-noise exams"
                else:
                    calibration = [real["calib"][i:i + 1] for i in range(len(real["calib"]))]
                    results["int8_calibration"] = f"{len(calibration)} prepared mini-MIAS exams"
                quantized = quantize_onnx(path, work / f"{name}.int8.onnx", iter(calibration))
                q_session = OnnxModel(quantized, threads=threads, check_input=False)
                ort_steps[f"{name} int8"] = lambda q_session=q_session: q_session(exam)
            if variants and name == DEFAULT_MODEL:
                import onnxruntime as ort

                from tlese.bundle.onnx import session_options

                options = session_options(threads)
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                extended = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                ort_steps[f"{name} [ORT_ENABLE_EXTENDED]"] = lambda s=extended: s.run(None, {"image": exam})
                no_spin = OnnxModel(path, threads=threads, check_input=False, spinning=False)
                ort_steps[f"{name} [no spinning]"] = lambda s=no_spin: s(exam)
                for tag, file in (
                    ("static batch", export_onnx(model, work / f"{name}.static.onnx", size, "dual",
                                                 dynamic_batch=False)),
                    ("TorchScript exporter", _torchscript_export(model, work / f"{name}.ts.onnx", size)),
                    ("symmetric padding", export_onnx(_symmetric_lite0(size), work / f"{name}.sym.onnx", size,
                                                      "dual") if name == "tlese_lite0" else None),
                ):
                    if file is not None:
                        variant = OnnxModel(file, threads=threads, check_input=False)
                        ort_steps[f"{name} [{tag}]"] = lambda s=variant: s(exam)
        log(f"timing ONNX Runtime: {', '.join(ort_steps)}")
        results["ort"] = _rows(paused_interleaved(ort_steps, ort_reps, warmup=2, pause=pause))
        log(f"timing PyTorch eager: {', '.join(eager)}")
        results["eager"] = _rows(interleaved(eager, eager_reps, warmup=1))
        results["view_parallel_max_abs_diff"] = extra
        if int8 and drift:
            results["int8_real"] = int8_real(size, work, threads=threads, pause=pause, log=log)
    finally:
        if scratch:
            scratch.cleanup()
    return results


def _fmt_ratio(row: dict) -> str:
    if f"x_{BASELINE}" not in row:
        return ""
    low, high = row[f"x_{BASELINE}_range"]
    return f"**{row[f'x_{BASELINE}']}** ({low}-{high})"


def verdicts(results: dict) -> list[str]:
    ort_rows, lines = results["ort"], []
    for name in (n for n in results["models"] if n in TLESE):
        row = ort_rows[name]
        best, median = row["ms_best"], row["ms_median"]
        text = (f"- {name}{' (default)' if name == DEFAULT_MODEL else ''}: ONNX Runtime {best} ms best / {median} ms "
                f"median per exam ({'meets' if best <= GOAL_MS else 'misses'} <= {GOAL_MS:g} ms by best-of-N, "
                f"{'meets' if median <= GOAL_MS else 'misses'} by median)")
        if f"x_{BASELINE}" in row:
            ratio = row[f"x_{BASELINE}"]
            text += f"; {ratio}x {BASELINE} ({'meets' if ratio >= GOAL_X else 'misses'} >= {GOAL_X:g}x)"
        lines.append(text)
        for tag in ("view-parallel", "int8"):
            key = f"{name} {tag}"
            if key in ort_rows:
                lines.append(f"  - {tag}: {ort_rows[key]['ms_best']} ms best / {ort_rows[key]['ms_median']} ms "
                             f"median ({'meets' if ort_rows[key]['ms_best'] <= GOAL_MS else 'misses'} by best-of-N)")
    return lines


def findings(results: dict) -> list[str]:
    """What each variant of the default model did, as median-latency ratios against the plain export."""
    rows, base = results["ort"], results["ort"].get(DEFAULT_MODEL)
    if base is None:
        return []
    lines = []
    notes = {
        "ORT_ENABLE_EXTENDED": "graph level EXTENDED instead of ALL (no NCHWc conv layout)",
        "no spinning": "intra-op threads sleep between ops instead of spinning",
        "static batch": "batch fixed at 1 in the graph",
        "TorchScript exporter": "dynamo=False (SAME padding traced as a Shape/Pad subgraph, not fused)",
        "symmetric padding": "symmetric instead of TF-SAME padding (model change: ImageNet weights assume SAME)",
    }
    for tag, text in notes.items():
        row = rows.get(f"{DEFAULT_MODEL} [{tag}]")
        if row:
            lines.append(f"- {text}: {row['ms_median'] / base['ms_median']:.2f}x the latency (median; best "
                         f"{row['ms_best']} vs {base['ms_best']} ms)")
    for tag, text in (("view-parallel", "CC and MLO on two 1-thread sessions at once instead of one 2-thread "
                                        "session"), ("int8", "int8 static quantisation")):
        for name in TLESE:
            row = rows.get(f"{name} {tag}")
            if row and name in rows:
                lines.append(f"- {name}, {text}: {row['ms_median'] / rows[name]['ms_median']:.2f}x the latency "
                             "(median)")
    if lines:
        lines.append("- BatchNorm folding needs no step of ours: the dynamo exporter's optimiser already folds every "
                     "BN into its conv (the graph has no BatchNormalization node) and ONNX Runtime fuses ReLU6 "
                     "(Clip) into the convs. Static batch and symmetric padding leave the conv kernels as they "
                     "are (the pads are constants fused into the convs either way), so their distance from 1.0x is "
                     "this shared machine's noise.")
    return lines


def to_markdown(results: dict) -> str:
    proto, info = results["protocol"], results["machine"]
    lines = header("ONNX Runtime vs PyTorch eager: one dual-view exam on the CPU", results)
    lines[-2] += "  "
    lines[-1:-1] = [f"Also: onnx {info.get('onnx')}, onnxruntime {info.get('onnxruntime')}, onnxscript "
                    f"{info.get('onnxscript')}; load average at the end {' '.join(results.get('loadavg_end', []))}"]
    lines += [
        f"One exam = input {proto['input']} (CC, MLO), batch 1, {results['threads']} threads (ONNX Runtime intra-op "
        f"threads, torch threads). ONNX Runtime: `export_onnx(views='dual')` (dynamo exporter, dynamic batch) + "
        f"`OnnxModel` (CPUExecutionProvider, ORT_ENABLE_ALL); {proto['ort_reps']} interleaved repetitions after "
        f"{proto['ort_warmup']} warm-up calls, {proto['ort_pause_s']} s untimed pause before each call (lets the "
        "previous session's spinning threads go idle: back to back they steal the cores, +50 % here). "
        f"Eager: `inference_mode`, eval, NCHW; {proto['eager_reps']} interleaved "
        f"repetitions after {proto['eager_warmup']} warm-up. `x {BASELINE}`: speed over {BASELINE} in the same group "
        "(ONNX Runtime rows against ONNX Runtime ResNet-50, eager against eager), paired per repetition, median "
        "(min-max). Random init, 4 classes, 1 channel, fp32 unless marked. The machine is shared with other jobs "
        "(load average above): best-of-N is the closest to an idle machine, the median shows the load.", "",
        "| model | ORT best ms | ORT median ms | ORT x resnet50 | eager best ms | eager median ms | eager x resnet50 "
        "| ORT speed-up over eager (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = results.get("eager", {})
    for name, row in results["ort"].items():
        e = eager.get(name)
        speedup = f"{e['ms_median'] / row['ms_median']:.1f}x" if e else ""
        cells = [e["ms_best"], e["ms_median"], _fmt_ratio(e)] if e else ["", "", ""]
        lines.append(f"| {name} | {row['ms_best']} | {row['ms_median']} | {_fmt_ratio(row)} | "
                     + " | ".join(str(c) for c in cells) + f" | {speedup} |")
    lines += ["", "## Goals (issue: the auxiliary tool)", "",
              f"Default TLese model `{DEFAULT_MODEL}`: <= {GOAL_MS:g} ms per exam with ONNX Runtime and >= {GOAL_X:g}x "
              f"{BASELINE} in the same run.", "", *verdicts(results), ""]
    found = findings(results)
    if found:
        lines += [f"## What helps {DEFAULT_MODEL} under ONNX Runtime", "", *found, ""]
    lines += ["## Export", "", "| model | export s | file MB | max abs logit diff ORT vs eager (this exam) |",
              "|---|---:|---:|---:|"]
    for name, row in results["export"].items():
        lines.append(f"| {name} | {row['export_s']} | {row['file_MB']} | {row['max_abs_diff']:.2e} |")
    for name, diff in results.get("view_parallel_max_abs_diff", {}).items():
        lines.append(f"| {name} (single-view graph) |  |  | {diff:.2e} |")
    lines += ["", "Random-init TLese nets give near-constant logits (their features vanish), so these diffs are a "
              "smoke check only; tests/serve/test_export.py checks parity (< 1e-4) on BN-calibrated weights.", ""]
    lines += int8_markdown(results)
    return "\n".join(lines)


def int8_markdown(results: dict) -> list[str]:
    """The int8 sections: what the table's int8 row was calibrated on, and the mini-MIAS measurement."""
    lines = ["## int8", "",
             f"The table's `{DEFAULT_MODEL} int8` row: static QDQ quantisation (`quantize_onnx`) calibrated on "
             + results.get("int8_calibration", "2 uniform-noise exams (the code before #21); timed only, its "
                           "accuracy is not measured by it") + ".", ""]
    real = results.get("int8_real")
    if not real:
        return lines + ["int8 on mini-MIAS: not measured (no ../shared/data/mini-mias or no Lite0 ImageNet weights).",
                        ""]
    info = real.get("machine") or results["machine"]
    lines += [
        "### int8 on prepared mini-MIAS exams (what `tlese bundle --int8` does)", "",
        f"Command: `{real.get('command', results['command'])}`; date {real.get('date', results['date'])}; machine "
        f"{info['cpu']}, {info['cores']} cores, load average {' '.join(info['loadavg_1_5_15'])} at the start, "
        f"{' '.join(real.get('loadavg_end', results.get('loadavg_end', [])))} at the end (shared with other work: "
        "best-of-N is the closest to an idle machine); onnxruntime " + str(info.get("onnxruntime")) + ".", "",
        f"Weights: {real['weights']}. Exported as bundles export (outputs logits + features, {real['size']} px, dual "
        f"view, each MLO image in both view slots), quantised on {real['calibration_exams']} prepared exams "
        f"({real['quantise_s']} s), compared on {real['eval_exams']} exams of other women; one exam timed "
        f"{real['reps']} times per variant, interleaved, {real['threads']} threads, after 2 warm-up calls. fp32: "
        f"density macro AUC {real['fp32_macro_auc']} (a probe on 32 exams: the AUC is there to be compared, not "
        "to be good).", "",
        "Feature change over spread: |int8 - fp32| of an exam's features over the distance of its fp32 features "
        "from the mean of all held-out exams' (what tells exams apart), median over exams.", "",
        "| variant | ms best | ms median | file MB | feature rel. L2 median (max) | feature cosine median (min) "
        "| feature change over spread | max prob change | mean prob change | predicted class changed "
        "| density macro AUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 | {real['latency']['fp32']['ms_best']} | {real['latency']['fp32']['ms_median']} | "
        f"{real['fp32_file_MB']} |  |  |  |  |  |  | {real['fp32_macro_auc']} |",
    ]
    for name, row in real["variants"].items():
        timing = real["latency"][name]
        lines.append(f"| {name} | {timing['ms_best']} | {timing['ms_median']} | {row['file_MB']} | "
                     f"{row['feature_rel_l2_median']} ({row['feature_rel_l2_max']}) | {row['feature_cosine_median']} "
                     f"({row['feature_cosine_min']}) | {row.get('feature_change_over_spread_median', '')} | "
                     f"{row['max_abs_prob_change']} | {row['mean_abs_prob_change']} | "
                     f"{100 * row['predicted_class_changed']:.1f} % | {row['macro_auc']} |")
    best, median = real["latency"]["int8"]["ms_best"], real["latency"]["int8"]["ms_median"]
    auc_change = real["variants"]["int8"]["macro_auc"] - real["fp32_macro_auc"]
    lines += ["", f"- Goal <= {GOAL_MS:g} ms per exam ({DEFAULT_MODEL}, int8): {best} ms best "
              f"({'meets' if best <= GOAL_MS else 'misses'}), {median} ms median "
              f"({'meets' if median <= GOAL_MS else 'misses'}); fp32 in the same run "
              f"{real['latency']['fp32']['ms_best']} ms best.",
              f"- Density macro AUC change int8 - fp32 on these {real['eval_exams']} exams: {auc_change:+.4f} (the "
              "bundle check's limit is 0.005, on a bundle's own out-of-fold cases): int8 "
              + ("keeps" if abs(auc_change) <= 0.005 else "does not keep")
              + " this model's answers. Whether a trained bundle's do is what `tlese bundle --int8` checks on its "
              "out-of-fold cases before it offers the int8 files."]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-reps", type=int, default=10)
    parser.add_argument("--eager-reps", type=int, default=3)
    parser.add_argument("--view-parallel", nargs="*", default=list(TLESE), help="models with a view-parallel row")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 row and its accuracy measurement")
    parser.add_argument("--no-variants", action="store_true", help="skip the export/ORT variants of the default model")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, 1 repetition, no variants or drift")
    parser.add_argument("--only", choices=["int8"], default=None,
                        help="int8: only the mini-MIAS int8 measurement (a few minutes); with --write it replaces that "
                             "part of <out>/onnx.json and rewrites onnx.md from it")
    parser.add_argument("--write", action="store_true", help="write <out>/onnx.md and onnx.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.ort_reps, args.eager_reps, args.no_variants = 64, 1, 1, True
    command = command_line("bench_onnx.py", argv)
    torch.set_num_threads(args.threads)
    info = machine(PACKAGES)
    if args.only == "int8":
        return _only_int8(args, command, info)
    results = run(args.models, args.size, args.threads, args.ort_reps, args.eager_reps,
                  [m for m in args.view_parallel if m in args.models], int8=not args.no_int8,
                  drift=not args.quick, variants=not args.no_variants,
                  log=lambda text: print(text, file=sys.stderr, flush=True))
    load = Path("/proc/loadavg")
    results.update(command=command, date=now(), machine=info,
                   loadavg_end=load.read_text().split()[:3] if load.is_file() else [])
    publish(results, to_markdown(results), args.out, "onnx", args.write)
    return 0


def _only_int8(args: argparse.Namespace, command: str, info: dict) -> int:
    """`--only int8`: the mini-MIAS int8 measurement, merged into the written results (the rest kept)."""
    import json

    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench_onnx_int8_") as work:
        real = int8_real(args.size, Path(work), threads=args.threads, log=log)
    if real is None:
        return 1
    load = Path("/proc/loadavg")
    real.update(command=command, date=now(), machine=info,
                loadavg_end=load.read_text().split()[:3] if load.is_file() else [])
    previous = args.out / "onnx.json"
    results = json.loads(previous.read_text()) if previous.is_file() else None
    if results is None or "ort" not in results:
        print("\n".join(int8_markdown({"int8_real": real, "machine": info, "command": command, "date": now()})))
        return 0
    results.pop("int8_drift", None)  # the measurement this one replaces
    results["int8_real"] = real
    publish(results, to_markdown(results), args.out, "onnx", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
