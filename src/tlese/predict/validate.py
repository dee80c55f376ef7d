"""`tlese evaluate BUNDLE --dataset NAME --root DIR [--task T] --out DIR`: a bundle on a labelled external set.

How a site checks a model on its own data before use. The labelled table comes from the dataset adapter and its
labels are encoded by the task (default: the bundle's own task; else anything `tlese.data.tasks.resolve_task`
takes), whose classes must be the bundle's, in the bundle's order (else `ValueError`). The adapter's table is the
truth of side and view: it is written as a manifest CSV (`OUT/predict_inputs.csv`: patient, side, view, path) and
every labelled image is predicted through it by `tlese.predict.pipeline.predict`, the very path of `tlese predict`
(same preprocessing, same verdicts; a DICOM header that contradicts the table refuses the image), for DICOM and PNG
sets alike. Its per-breast results (`OUT/predict/breasts/*.json`) are joined back to the labelled breasts through
the sha256 of their image files (`images[].sha256`), so no second preprocessing path exists. Breasts that predict
refuses are counted with their reasons and left out of the metrics; degraded ones (one view) are kept and counted.

The report (`OUT/report.md`, `OUT/report.html`, `OUT/plots/`, `OUT/tables/`) is the one `merge` writes: metrics with
patient-bootstrap CIs (per-class AUC / sensitivity / specificity included), ROC curves, confusion matrix, plus
reliability diagrams; metrics are on the bundle's calibrated probabilities, the raw (uncalibrated) macro AUC is noted.
`OUT/predictions.csv` has one row per evaluated breast with the calibrated (`prob_<class>`) and raw
(`raw_prob_<class>`) probabilities, keyed by patient_id and side of the labelled table.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PREDICT_DIR = "predict"
MANIFEST_FILE = "predict_inputs.csv"
TRAINING_OVERLAP_WARNING = ("the training patients of this bundle must not be in this evaluation set: a patient "
                            "the model was trained on makes these metrics optimistic")


def _check_classes(task: Any, bundle: Any) -> None:
    classes, expected = list(task.classes), list(bundle.class_names)
    if classes != expected:
        order = " (same classes, different order)" if sorted(classes) == sorted(expected) else ""
        raise ValueError(f"task {task.name!r} has classes {classes}, the bundle predicts {expected}{order}: an "
                         "external evaluation needs a task with the bundle's classes in the bundle's order")


def _resolve_task(task: Any, bundle: Any):
    """The task to encode labels with: the bundle's own when `task` is None, else what `resolve_task` accepts (a
    registered name, a YAML file, an inline mapping; `get_task` while resolve_task is not there)."""
    if task is None:
        try:
            return bundle.task
        except (KeyError, AttributeError, TypeError, ValueError):
            raise ValueError("the bundle records no task: give the task to evaluate with (--task)") from None
    try:
        from tlese.data.tasks import resolve_task
    except ImportError:
        from tlese.data.tasks import get_task as resolve_task
    return resolve_task(task)


def write_manifest(encoded: pd.DataFrame, path: Path) -> Path:
    """The adapter's labelled images as a predict manifest (patient, side, view, path relative to the manifest's
    folder), owner-readable only (it names the set's patients)."""
    import os

    from tlese.files import write_bytes_atomic

    rows = encoded[["patient_id", "side", "view", "path"]].astype(str).drop_duplicates()
    table = pd.DataFrame({"patient": rows["patient_id"], "side": rows["side"], "view": rows["view"],
                          "path": [os.path.relpath(Path(p).resolve(), path.parent.resolve()) for p in rows["path"]]})
    write_bytes_atomic(path, table.to_csv(index=False).encode(), mode=0o600)
    return path


def _labelled_breasts(encoded: pd.DataFrame) -> pd.DataFrame:
    """One row per labelled breast: patient_id, side, target, target_name, images."""
    return (encoded.groupby(["patient_id", "side"], as_index=False, sort=True)
            .agg(target=("target", "first"), target_name=("target_name", "first"), images=("path", "count")))


def _join(results: dict[str, dict], sha_to_breast: dict[str, tuple[str, str]]) -> tuple[dict, list[str]]:
    """Labelled breast (patient, side) -> predict results whose images are that breast's files; notes on results
    whose images belong to no or several labelled breasts (left out)."""
    joined: dict[tuple[str, str], list[dict]] = {}
    unmatched = ambiguous = 0
    for result in results.values():
        owners = {sha_to_breast[image["sha256"]] for image in result.get("images", [])
                  if image.get("sha256") in sha_to_breast}
        if not owners:
            unmatched += 1
        elif len(owners) > 1:
            ambiguous += 1
        else:
            joined.setdefault(owners.pop(), []).append(result)
    notes = []
    if unmatched:
        notes.append(f"{unmatched} predicted breast(s) have no image of the labelled table: left out")
    if ambiguous:
        notes.append(f"{ambiguous} predicted breast(s) hold images of several labelled breasts (the headers group "
                     "them differently from the labels): left out of the metrics")
    return joined, notes


def evaluate_bundle(bundle: Any, dataset: str, root: str | Path, task: Any, out_dir: str | Path, n_boot: int = 1000,
                    seed: int = 0, *, trusted_keys: Any = None, allow_unsigned: bool = False) -> dict[str, Path]:
    """Evaluate `bundle` (a loaded `Bundle`, or its path: loaded with `trusted_keys` / `allow_unsigned`) on the
    labelled set `dataset` at `root`, labels encoded by `task` (None: the bundle's own; a name, YAML file, mapping or
    Task), into `out_dir`. Returns the paths written: md, html, predictions_csv, calibration_plot,
    raw_calibration_plot, evaluation_json, predict_dir, manifest."""
    from tlese.bundle.format import load_bundle
    from tlese.data.datasets import get_adapter
    from tlese.evaluate.metrics import PRIMARY_METRIC, classification_metrics, prob_column
    from tlese.evaluate.report import PLOTS_DIR, plot_calibration, write_report
    from tlese.evaluate.tables import summary_table
    from tlese.files import sha256_file
    from tlese.predict.pipeline import predict
    from tlese.provenance import environment_info

    if not hasattr(bundle, "predict_arrays"):
        keys = {"trusted_keys": trusted_keys} if trusted_keys is not None else {}
        bundle = load_bundle(bundle, **keys, **({"allow_unsigned": True} if allow_unsigned else {}))
    task = _resolve_task(task, bundle)
    _check_classes(task, bundle)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(bundle.class_names)

    table = get_adapter(dataset)(root)
    encoded, encode_report = task.encode(table)
    if not len(encoded):
        raise ValueError(f"{dataset} at {root}: no labelled image for task {task.name} ({encode_report.summary()})")
    labelled = _labelled_breasts(encoded)
    sha_to_breast = {sha256_file(Path(path)): (str(patient), str(side))
                     for path, patient, side in encoded[["path", "patient_id", "side"]].itertuples(index=False)}
    labelled = labelled.assign(patient_id=labelled["patient_id"].astype(str), side=labelled["side"].astype(str))

    # The same path as `tlese predict`, on exactly the labelled images, with the adapter's side and view.
    predict_dir = out_dir / PREDICT_DIR
    manifest = write_manifest(encoded, out_dir / MANIFEST_FILE)
    summary = predict(bundle, [manifest], predict_dir)
    document = json.loads((predict_dir / "predictions.json").read_text())
    joined, join_notes = _join(document["breasts"], sha_to_breast)

    rows, refused_reasons, verdicts = [], Counter(), Counter()
    not_predicted = 0
    for breast in labelled.itertuples(index=False):
        found = joined.get((breast.patient_id, breast.side), [])
        usable = [result for result in found if result["verdict"] != "refused"]
        if not found:
            not_predicted += 1
            verdicts["refused"] += 1
            refused_reasons["no image of this breast was read by predict (see the refused inputs)"] += 1
            continue
        if not usable:
            verdicts["refused"] += 1
            for reason in dict.fromkeys(reason for result in found for reason in result["reasons"]):
                refused_reasons[reason] += 1
            continue
        verdict = "ok" if any(result["verdict"] == "ok" for result in usable) else "degraded"
        verdicts[verdict] += 1
        calibrated = np.mean([[result["probabilities"][name] for name in classes] for result in usable], axis=0)
        raw = np.mean([[result["raw_probabilities"][name] for name in classes] for result in usable], axis=0)
        rows.append({"patient_id": breast.patient_id, "side": breast.side, "view": "breast",
                     "target": int(breast.target), "target_name": breast.target_name,
                     "pred": int(np.argmax(calibrated)), "predicted": classes[int(np.argmax(calibrated))],
                     **{prob_column(name): float(p) for name, p in zip(classes, calibrated)},
                     **{f"raw_{prob_column(name)}": float(p) for name, p in zip(classes, raw)},
                     "verdict": verdict, "exams": len(usable),
                     "exam_keys": ";".join(result["exam_key"] for result in usable)})
    predictions = pd.DataFrame(rows)
    if not len(predictions):
        raise ValueError(f"predict refused every one of the {len(labelled)} labelled breasts: "
                         + "; ".join(f"{count} x {reason}" for reason, count in refused_reasons.most_common(5)))
    predictions_csv = out_dir / "predictions.csv"
    predictions.to_csv(predictions_csv, index=False)

    y_true = predictions["target"].to_numpy(dtype=int)
    calibrated = predictions[[prob_column(name) for name in classes]].to_numpy(dtype=float)
    raw = predictions[[f"raw_{prob_column(name)}" for name in classes]].to_numpy(dtype=float)
    raw_metrics = classification_metrics(y_true, raw, classes)
    calibrated_metrics = classification_metrics(y_true, calibrated, classes)
    plots_dir = out_dir / PLOTS_DIR
    calibration_plot = plot_calibration(y_true, calibrated, classes, plots_dir / "calibration.png",
                                        title="Calibration: calibrated probabilities (reported)")
    raw_calibration_plot = plot_calibration(y_true, raw, classes, plots_dir / "calibration_raw.png",
                                            title="Calibration: raw probabilities (before temperature)")

    summary_frame = summary_table(predictions, classes, n_boot=n_boot, seed=seed)
    summary_frame = summary_frame.drop(columns=["mean", "std", "n_folds", "mean ± std"])
    n_patients, n_breasts = int(labelled["patient_id"].nunique()), len(labelled)
    card = getattr(bundle, "card", None) or {}
    training = card.get("training_data") or {}
    if training.get("patients") is not None:
        trained_on = (f"the bundle's card lists {training['patients']} training patients of adapter "
                      f"{training.get('dataset_adapter', '?')!r} (counts only, no IDs: overlap cannot be checked)")
    else:
        trained_on = "the bundle's card lists no training patients: overlap cannot be checked"
    refused_total = verdicts["refused"]
    notes = [
        f"External evaluation of bundle {bundle.sha256} on {dataset} ({n_patients} patients, {n_breasts} labelled "
        f"breasts; task {task.name}; root {root}).",
        f"WARNING: {TRAINING_OVERLAP_WARNING}; {trained_on}.",
        f"Breasts evaluated: {len(predictions)} of {n_breasts} ({verdicts['ok']} ok, {verdicts['degraded']} "
        f"degraded: one view, predicted from it alone and included; {refused_total} refused by predict: excluded "
        "from the metrics).",
        *[f"refused: {count} breast(s) with reason: {reason}" for reason, count in refused_reasons.most_common()],
        f"Metrics are on the bundle's calibrated probabilities (temperature {float(bundle.temperature):.4g}); raw "
        f"(uncalibrated) macro AUC {raw_metrics[PRIMARY_METRIC]:.4f}, calibrated "
        f"{calibrated_metrics[PRIMARY_METRIC]:.4f}.",
        f"bootstrap: {n_boot} patient-level resamples, seed {seed}; breast-level predictions (several exams of one "
        "breast averaged).",
        f"labels: {encode_report.summary()}",
        *join_notes,
    ]
    if summary.refused_inputs:
        reasons = Counter(entry["reason"] for entry in summary.refused_inputs)
        notes.append(f"{len(summary.refused_inputs)} input file(s) refused by predict: "
                     + "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(5)))
    if not_predicted:
        notes.append(f"{not_predicted} labelled breast(s) had no image read by predict")
    counts = []
    for index, name in enumerate(classes):
        of_class = labelled[labelled["target"] == index]
        evaluated = predictions[predictions["target"] == index]
        counts.append({"class": name, "patients": int(of_class["patient_id"].nunique()),
                       "labelled breasts": len(of_class), "evaluated breasts": len(evaluated),
                       "degraded": int((evaluated["verdict"] == "degraded").sum()),
                       "refused": len(of_class) - len(evaluated)})
    data_summary = pd.DataFrame(counts)
    config = {"evaluation": "external", "bundle": str(getattr(bundle, "path", "")), "bundle_sha256": bundle.sha256,
              "dataset": dataset, "root": str(root), "task": task.to_dict(), "n_boot": n_boot, "seed": seed,
              "temperature": float(bundle.temperature), "training_data": training}
    paths = write_report(
        out_dir, title=f"External evaluation of bundle {bundle.sha256[:12]} on {dataset}",
        summary_table=summary_frame, per_fold_table=None, predictions=predictions, class_names=classes,
        history=None, config=config, environment=environment_info(), data_summary=data_summary,
        comparison_table=None, notes=notes,
        extra_plots={"Calibration (calibrated probabilities, reported)": calibration_plot,
                     "Calibration (raw probabilities)": raw_calibration_plot})
    evaluation = {"bundle_sha256": bundle.sha256, "dataset": dataset, "task": task.name, "patients": n_patients,
                  "labelled_breasts": n_breasts, "evaluated_breasts": len(predictions), "ok": verdicts["ok"],
                  "degraded": verdicts["degraded"], "refused": refused_total, "refused_reasons": dict(refused_reasons),
                  "macro_auc": calibrated_metrics[PRIMARY_METRIC], "raw_macro_auc": raw_metrics[PRIMARY_METRIC],
                  "notes": notes}
    evaluation_json = out_dir / "evaluation.json"
    evaluation_json.write_text(json.dumps(evaluation, indent=1, default=float) + "\n")
    return {"md": Path(paths["md"]), "html": Path(paths["html"]), "predictions_csv": predictions_csv,
            "calibration_plot": calibration_plot, "raw_calibration_plot": raw_calibration_plot,
            "evaluation_json": evaluation_json, "predict_dir": predict_dir, "manifest": manifest}


# ---------------------------------------------------------------------------------------------------------------
# Command line


__all__ = ["MANIFEST_FILE", "TRAINING_OVERLAP_WARNING", "evaluate_bundle", "write_manifest"]
