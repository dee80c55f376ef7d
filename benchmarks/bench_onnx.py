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
- `int8`: static post-training quantisation (`quantize_onnx`) of the default model; its accuracy cost on real
  mammograms (ImageNet-pretrained Lite0, mini-MIAS) is measured when ../shared/data and those weights are present.
- variants of the default model (off with `--no-variants`): graph level ORT_ENABLE_EXTENDED (no NCHWc layout), no
  thread spinning, a static-batch export, the TorchScript exporter (`dynamo=False`), symmetric instead of TF-SAME
  padding (a model change, measured only).

    .venv/bin/python benchmarks/bench_onnx.py --write
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
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
SHARED_MIAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias" / "images"


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


def int8_drift(size: int, workdir: Path, n_calib: int = 8, n_eval: int = 16, log=print) -> dict | None:
    """Accuracy cost of int8: ImageNet-pretrained tlese_lite0 with an identity head (logits = pooled features),
    fp32 vs int8 ONNX on mini-MIAS exams (two images each) not used for calibration. None without the data or
    the weights."""
    from PIL import Image

    from tlese.bundle.onnx import OnnxModel, export_onnx, quantize_onnx

    files = sorted(SHARED_MIAS.glob("*.png")) if SHARED_MIAS.is_dir() else []
    if len(files) < 2 * (n_calib + n_eval):
        return None
    try:
        model = build_dual("tlese_lite0", pretrained=True)
    except Exception as error:  # weights not available offline
        log(f"int8 drift: skipped ({type(error).__name__})")
        return None
    features = model.num_features
    model.head = torch.nn.Linear(features, features)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(features))
        model.head.bias.zero_()
    images = np.stack([np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255
                       for f in files[: 2 * (n_calib + n_eval)]])
    exams = images.reshape(-1, 2, 1, size, size)
    fp32 = export_onnx(model, workdir / "lite0_imagenet.onnx", size, "dual")
    int8 = quantize_onnx(fp32, workdir / "lite0_imagenet.int8.onnx", (exams[i : i + 1] for i in range(n_calib)))
    a, b = OnnxModel(fp32, threads=2), OnnxModel(int8, threads=2)
    cosine, rel = [], []
    for i in range(n_calib, n_calib + n_eval):
        fa, fb = a(exams[i : i + 1])[0], b(exams[i : i + 1])[0]
        cosine.append(float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))))
        rel.append(float(np.linalg.norm(fa - fb) / np.linalg.norm(fa)))
    return {"calibration_exams": n_calib, "eval_exams": n_eval, "size": size,
            "cosine_median": round(statistics.median(cosine), 4), "cosine_min": round(min(cosine), 4),
            "rel_l2_median": round(statistics.median(rel), 4), "rel_l2_max": round(max(rel), 4)}


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
                rng = np.random.default_rng(1)
                quantized = quantize_onnx(path, work / f"{name}.int8.onnx",
                                          (rng.random(exam.shape, dtype=np.float32) for _ in range(2)))
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
            results["int8_drift"] = int8_drift(size, work, log=log)
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
    drift = results.get("int8_drift")
    if drift:
        lines += ["## int8 accuracy cost (not shipped)", "",
                  f"ImageNet-pretrained tlese_lite0, identity head (logits = pooled 1280-d features), fp32 vs int8 "
                  f"ONNX (static QDQ, per-channel, MinMax over {drift['calibration_exams']} mini-MIAS exams) on "
                  f"{drift['eval_exams']} other exams at {drift['size']} px: feature cosine median "
                  f"{drift['cosine_median']} (min {drift['cosine_min']}), relative L2 error median "
                  f"{drift['rel_l2_median']} (max {drift['rel_l2_max']}). Post-training int8 moves the features "
                  f"by ~{100 * drift['rel_l2_median']:.0f} %: it needs quantisation-aware fine-tuning or a validated "
                  "AUC before any clinical use.", ""]
    elif "int8_drift" in results:
        lines += ["int8 accuracy cost: not measured (no ../shared/data/mini-mias or no Lite0 ImageNet weights).", ""]
    return "\n".join(lines)


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
    parser.add_argument("--write", action="store_true", help="write <out>/onnx.md and onnx.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.ort_reps, args.eager_reps, args.no_variants = 64, 1, 1, True
    command = command_line("bench_onnx.py", argv)
    torch.set_num_threads(args.threads)
    info = machine(PACKAGES)
    results = run(args.models, args.size, args.threads, args.ort_reps, args.eager_reps,
                  [m for m in args.view_parallel if m in args.models], int8=not args.no_int8,
                  drift=not args.quick, variants=not args.no_variants,
                  log=lambda text: print(text, file=sys.stderr, flush=True))
    load = Path("/proc/loadavg")
    results.update(command=command, date=now(), machine=info,
                   loadavg_end=load.read_text().split()[:3] if load.is_file() else [])
    publish(results, to_markdown(results), args.out, "onnx", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
