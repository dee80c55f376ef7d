"""Aggregate the finished folds of a run: leakage checks, metrics, comparison between arms, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tlese.train.config import load_experiment
from tlese.train.cv import PREDICTIONS_BREASTS, PREDICTIONS_IMAGES, assert_no_leakage
from tlese.train.engine import read_history


def _arm_predictions(arm_dir: Path, file_name: str) -> pd.DataFrame | None:
    frames = []
    for fold_dir in sorted(arm_dir.glob("fold_*")):
        path = fold_dir / file_name
        if not path.is_file():
            continue
        split = pd.read_csv(fold_dir / "split.csv", dtype={"patient_id": str})
        assert_no_leakage(split, str(fold_dir))
        predictions = pd.read_csv(path, dtype={"patient_id": str})
        test_patients = set(split.loc[split["role"] == "test", "patient_id"])
        outside = set(predictions["patient_id"]) - test_patients
        if outside:
            raise AssertionError(f"{path}: predictions for patients outside the test fold, e.g. {sorted(outside)[:3]}")
        frames.append(predictions)
    return pd.concat(frames, ignore_index=True) if frames else None


def _arm_history(arm_dir: Path) -> pd.DataFrame | None:
    frames = []
    for stage_dir in sorted([arm_dir / "stage1_cxr", *arm_dir.glob("fold_*")]):
        history = read_history(stage_dir)
        if len(history):
            frames.append(history.assign(stage="cxr" if stage_dir.name == "stage1_cxr" else "target",
                                         fold=stage_dir.name.removeprefix("fold_") if stage_dir.name != "stage1_cxr" else ""))
    return pd.concat(frames, ignore_index=True) if frames else None


def _fold_infos(arm_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(arm_dir.glob("fold_*/fold_info.json"))]


def merge_run(run_dir: str | Path, references: list[str] | None = None) -> dict[str, Path]:
    """Write `<arm>/report.{html,md}` for each arm with predictions and `report.{html,md}` comparing the arms.

    Paired tests compare every arm with each of `references` (default: the config's first arm); a pair is tested
    once, against the earlier reference.
    """
    from tlese.data.tasks import get_task
    from tlese.evaluate.report import write_report
    from tlese.evaluate.tables import comparison_table, fold_warnings, per_fold_table, summary_table

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a run folder (no resolved config)")
    experiment = load_experiment(config_path)
    config = yaml.safe_load(config_path.read_text())
    environment = json.loads((run_dir / "environment.json").read_text())
    notes = json.loads((run_dir / "notes.json").read_text()) if (run_dir / "notes.json").is_file() else []
    data_summary = pd.read_csv(run_dir / "data_summary.csv") if (run_dir / "data_summary.csv").is_file() else None
    class_names = list(get_task(experiment.target.task).classes)

    unit_predictions: dict[str, pd.DataFrame] = {}
    rows = []
    reports = {}
    for arm in experiment.arms:
        arm_dir = run_dir / arm.name
        breasts = _arm_predictions(arm_dir, PREDICTIONS_BREASTS)
        images = _arm_predictions(arm_dir, PREDICTIONS_IMAGES)
        predictions = breasts if breasts is not None else images
        if predictions is None:
            continue
        unit = "breast" if breasts is not None else "image"
        unit_predictions[arm.name] = predictions
        summary = summary_table(predictions, class_names, n_boot=experiment.bootstrap, seed=experiment.seed)
        infos = _fold_infos(arm_dir)
        arm_notes = [*notes, *fold_warnings(predictions, class_names),
                     f"unit of analysis: {unit} ({len(predictions)} {unit}s, {predictions['patient_id'].nunique()} patients, "
                     f"{predictions['fold'].nunique()} of {experiment.folds} folds)"]
        arm_notes += sorted({f"init: {json.dumps(info['init'])}" for info in infos})
        if images is not None and breasts is not None:
            image_summary = summary_table(images, class_names, n_boot=0 if experiment.bootstrap == 0 else 200,
                                          seed=experiment.seed)
            image_auc = image_summary.set_index("metric").loc["macro_auc", "mean ± std"]
            arm_notes.append(f"per-image macro AUC (each view alone): {image_auc}")
        reports[arm.name] = write_report(
            arm_dir, title=f"{experiment.name}: {arm.name} ({arm.model}, transfer {arm.transfer})",
            summary_table=summary, per_fold_table=per_fold_table(predictions, class_names), predictions=predictions,
            class_names=class_names, history=_arm_history(arm_dir), config=config, environment=environment,
            data_summary=data_summary, comparison_table=None, notes=arm_notes)
        metric = summary.set_index("metric")
        # What each fold really started from: an arm configured as "double" may have had no ImageNet file.
        imagenet = ", ".join(sorted({info.get("init", {}).get("imagenet", "unknown") for info in infos})) or "unknown"
        rows.append({"arm": arm.name, "model": arm.model, "transfer": arm.transfer, "ImageNet weights": imagenet,
                     "unit": unit,
                     "folds": int(predictions["fold"].nunique()),
                     "accuracy (mean ± std)": metric.loc["accuracy", "mean ± std"],
                     "macro AUC (mean ± std)": metric.loc["macro_auc", "mean ± std"],
                     "balanced accuracy (mean ± std)": metric.loc["balanced_accuracy", "mean ± std"],
                     "pooled macro AUC (95% CI)": metric.loc["macro_auc", "pooled (95% CI)"],
                     "train seconds": round(sum(info.get("seconds", 0) for info in infos), 1)})
    if not unit_predictions:
        raise FileNotFoundError(f"{run_dir}: no finished fold with predictions yet")
    overview = pd.DataFrame(rows)
    overview.to_csv(run_dir / "comparison.csv", index=False)
    comparison = None
    references = list(dict.fromkeys(references or [next(iter(unit_predictions))]))  # in order, each once
    missing = [name for name in references if name not in unit_predictions]
    if missing:
        raise ValueError(f"reference arm(s) {missing} have no predictions in {run_dir}; arms with predictions: "
                         f"{list(unit_predictions)}")
    if len(unit_predictions) > 1:
        tables = []
        for index, reference in enumerate(references):
            others = {name: frame for name, frame in unit_predictions.items() if name not in references[:index]}
            if len(others) > 1:
                tables.append(comparison_table(others, class_names, reference=reference,
                                               n_boot=max(experiment.bootstrap, 200), seed=experiment.seed))
        comparison = _holm_over_pairs(pd.concat(tables, ignore_index=True))
        comparison.to_csv(run_dir / "paired_tests.csv", index=False)
    first = next(iter(unit_predictions))
    top = write_report(
        run_dir, title=f"{experiment.name}: {len(unit_predictions)} arm(s), {experiment.folds}-fold patient-level CV",
        summary_table=overview, per_fold_table=None, predictions=unit_predictions[first], class_names=class_names,
        history=None, config=config, environment=environment, data_summary=data_summary, comparison_table=comparison,
        notes=[*notes, f"ROC and confusion matrix shown for the first arm ({first}); each arm's own report is in its folder",
               *[f"{name}: {paths['html']}" for name, paths in reports.items()]])
    return {"html": Path(top["html"]), "md": Path(top["md"])}


def _holm_over_pairs(comparison: pd.DataFrame) -> pd.DataFrame:
    """Add `p_holm_pairs`: each bootstrap metric's p Holm-adjusted over every arm pair tested in this merge.

    (`p_holm` of the DeLong rows adjusts over the classes of one pair; testing many arms needs the other correction.)
    """
    from tlese.evaluate.stats import holm_adjust

    comparison = comparison.assign(p_holm_pairs=np.nan)
    bootstrap = comparison["test"] == "paired patient bootstrap"
    for _, rows in comparison[bootstrap].groupby("metric"):
        comparison.loc[rows.index, "p_holm_pairs"] = holm_adjust(rows["p_value"].to_numpy(dtype=float))
    return comparison
