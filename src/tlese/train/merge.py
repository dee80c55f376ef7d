"""Aggregate the finished folds of a run: checks against the run's records, metrics, comparison between arms, reports.

Before a number is computed, every finished fold is checked: its predictions hold exactly its test patients of the
run's fold file (each unit once, none missing), its split agrees with the fold file, and all folds of an arm were
made from the same settings. A fold not finished yet is named in the report, never silently left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tlese.train.config import Arm, Experiment, load_experiment
from tlese.train.cv import assert_no_leakage
from tlese.train.engine import read_history
from tlese.train.repeats import (
    TESTS_EXPLAINED,
    RepeatResults,
    collect_repeats,
    plot_repeat_metrics,
    repeat_tests,
    repeats_of,
    write_repeat_tables,
)
from tlese.train.rundir import ArmDir, FoldDir, RunDir


@dataclass
class ArmResults:
    """One arm's checked predictions and records."""

    arm: Arm
    arm_dir: ArmDir
    predictions: pd.DataFrame  # breasts when the run has them, else images
    images: pd.DataFrame | None
    unit: str
    records: list[dict]
    missing_folds: list[int] = field(default_factory=list)


def _check_fold(fold_dir: FoldDir, frame: pd.DataFrame, fold_patients: set[str], where: Path) -> None:
    """The fold's predictions are of its own test patients in the run's fold file, all of them, each unit once."""
    from tlese.evaluate.metrics import check_unique_units, unit_key_columns

    split = fold_dir.split()
    assert_no_leakage(split, str(fold_dir.path))
    recorded_test = set(split.loc[split["role"] == "test", "patient_id"])
    if recorded_test != fold_patients:
        raise AssertionError(f"{fold_dir.split_file}: its test patients differ from fold {fold_dir.fold} of the run's "
                             f"fold file ({len(recorded_test ^ fold_patients)} differ)")
    if set(frame["fold"].astype(int)) != {fold_dir.fold}:
        raise AssertionError(f"{where}: rows labelled with another fold than {fold_dir.fold}")
    predicted = set(frame["patient_id"])
    outside, missing = predicted - fold_patients, fold_patients - predicted
    if outside:
        raise AssertionError(f"{where}: predictions for patients outside test fold {fold_dir.fold}, "
                             f"e.g. {sorted(outside)[:3]}")
    if missing:
        raise AssertionError(f"{where}: {len(missing)} test patient(s) of fold {fold_dir.fold} have no prediction, "
                             "e.g. "
                             f"{sorted(missing)[:3]}")
    check_unique_units(frame, unit_key_columns(frame), str(where))


def _arm_predictions(arm_dir: ArmDir, unit: str, folds: pd.DataFrame) -> pd.DataFrame | None:
    """The checked predictions of every finished fold of the arm (`unit` "images" or "breasts")."""
    from tlese.evaluate.metrics import check_unique_units, unit_key_columns

    frames = []
    for fold_dir in arm_dir.predicted_folds():
        frame = fold_dir.predictions(unit)
        if frame is None:
            continue
        fold_patients = set(folds.loc[folds["fold"] == fold_dir.fold, "patient_id"])
        path = fold_dir.image_predictions_file if unit == "images" else fold_dir.breast_predictions_file
        _check_fold(fold_dir, frame, fold_patients, path)
        frames.append(frame)
    if not frames:
        return None
    merged = pd.concat(frames, ignore_index=True)
    check_unique_units(merged, unit_key_columns(merged), f"{arm_dir.path} (all folds)")  # no unit in two folds
    return merged


def _check_records(arm_dir: ArmDir, records: list[dict]) -> None:
    """All finished folds of an arm were made from the same settings (the fold number aside)."""
    made_from = {record.get("made_from") for record in records}
    if len(made_from) > 1:
        by_fold = {record["fold"]: record.get("made_from") for record in records}
        raise AssertionError(f"{arm_dir.path}: its folds were made from different settings ({by_fold}); rerun "
                             "`tlese cv` for this run, which names what changed, or start a new run")


def _arm_history(arm_dir: ArmDir) -> pd.DataFrame | None:
    frames = []
    for stage, fold in [(arm_dir.stage1, ""), *((fold_dir, str(fold_dir.fold)) for fold_dir in arm_dir.folds())]:
        history = read_history(stage.path)
        if len(history):
            frames.append(history.assign(stage="cxr" if fold == "" else "target", fold=fold))
    return pd.concat(frames, ignore_index=True) if frames else None


def collect_arm(run: RunDir, arm: Arm, folds: pd.DataFrame, repeat: int = 0) -> ArmResults | None:
    """One arm's checked predictions of one repeat (`folds`: that repeat's fold file); None when no fold finished."""
    arm_dir = run.arm(arm.name, repeat)
    breasts = _arm_predictions(arm_dir, "breasts", folds)
    images = _arm_predictions(arm_dir, "images", folds)
    predictions = breasts if breasts is not None else images
    if predictions is None:
        return None
    records = [fold_dir.record() for fold_dir in arm_dir.predicted_folds()]
    _check_records(arm_dir, records)
    finished = {record["fold"] for record in records}
    missing = sorted(int(k) for k in set(folds["fold"]) - finished)
    return ArmResults(arm, arm_dir, predictions, images if breasts is not None else None,
                      "breast" if breasts is not None else "image", records, missing)


def _selected_stage1(arm_dir: ArmDir) -> str | None:
    if not arm_dir.stage1_summary_file.is_file():
        return None
    summary = json.loads(arm_dir.stage1_summary_file.read_text())
    chosen = summary.get("selected") or {}
    if "val_acc" not in chosen:
        return None
    return (f"stage 1 (chest X-ray, ImageNet {summary.get('imagenet')}): selected epoch {chosen.get('epoch')} "
            f"by {chosen.get('monitor', 'val_loss')}, internal validation accuracy {chosen['val_acc']:.3f}")


def _arm_notes(results: ArmResults, experiment: Experiment, class_names: list[str], notes: list[str]) -> list[str]:
    from tlese.evaluate.metrics import METRICS, PRIMARY_METRIC
    from tlese.evaluate.tables import fold_warnings, summary_table

    predictions = results.predictions
    arm_notes = [*notes, *fold_warnings(predictions, class_names),
                 f"unit of analysis: {results.unit} ({len(predictions)} {results.unit}s, "
                 f"{predictions['patient_id'].nunique()} patients, {predictions['fold'].nunique()} of "
                 f"{experiment.folds} folds)"]
    if results.missing_folds:
        arm_notes.append(f"folds not finished (not in these numbers): {results.missing_folds}")
    arm_notes += sorted({f"init: {json.dumps(record['init'])}" for record in results.records})
    stage1 = _selected_stage1(results.arm_dir)
    if stage1:
        arm_notes.append(stage1)
    if results.images is not None:
        image_summary = summary_table(results.images, class_names, n_boot=0 if experiment.bootstrap == 0 else 200,
                                      seed=experiment.seed)
        value = image_summary.set_index("metric").loc[PRIMARY_METRIC, "mean ± std"]
        arm_notes.append(f"per-image {METRICS[PRIMARY_METRIC].label} (each view alone): {value}")
    return arm_notes


def _overview_row(results: ArmResults, summary: pd.DataFrame) -> dict:
    from tlese.evaluate.tables import overview_row

    arm = results.arm
    # What each fold really started from: an arm configured as "double" may have had no ImageNet file.
    imagenet = ", ".join(sorted({record.get("init", {}).get("imagenet", "unknown") for record in results.records}))
    return {"arm": arm.name, "model": arm.model, "transfer": arm.transfer, "ImageNet weights": imagenet or "unknown",
            "unit": results.unit, "folds": int(results.predictions["fold"].nunique()), **overview_row(summary),
            "train seconds": round(sum(record.get("seconds", 0) for record in results.records), 1)}


def _paired_tests(predictions: dict[str, pd.DataFrame], references: list[str], experiment: Experiment,
                  class_names: list[str]) -> pd.DataFrame | None:
    """Every arm against each reference (a pair once, against the earlier reference), Holm over pairs per metric."""
    from tlese.evaluate.tables import comparison_table

    if len(predictions) < 2:
        return None
    tables = []
    for index, reference in enumerate(references):
        others = {name: frame for name, frame in predictions.items() if name not in references[:index]}
        if len(others) > 1:
            # Arms with folds still running are compared on the units both have (n_dropped says how many not).
            tables.append(comparison_table(others, class_names, reference=reference,
                                           n_boot=max(experiment.bootstrap, 200), seed=experiment.seed,
                                           drop_unmatched=True))
    return _holm_over_pairs(pd.concat(tables, ignore_index=True)) if tables else None


def merge_run(run_dir: str | Path, references: list[str] | None = None) -> dict[str, Path]:
    """Write `<arm>/report.{html,md}` for each arm with predictions and `report.{html,md}` comparing the arms.

    Paired tests compare every arm with each of `references` (default: the config's first arm with predictions); a
    pair is tested once, against the earlier reference.
    """
    from tlese.data.splits import load_folds
    from tlese.data.tasks import get_task
    from tlese.evaluate.report import write_report
    from tlese.evaluate.tables import per_fold_table, summary_table

    run = RunDir(Path(run_dir))
    run.require()
    experiment = load_experiment(run.config_file)
    config = yaml.safe_load(run.config_file.read_text())
    environment = json.loads(run.environment_file.read_text()) if run.environment_file.is_file() else {}
    notes = run.notes()
    data_summary = pd.read_csv(run.data_summary_file) if run.data_summary_file.is_file() else None
    class_names = list(get_task(experiment.target.task).classes)
    folds_file = run.folds_file(experiment.seed, experiment.folds)
    if not folds_file.is_file():
        raise FileNotFoundError(f"{folds_file}: the run's fold file is missing; predictions cannot be checked")
    folds = load_folds(folds_file)

    collected = {arm.name: found for arm in experiment.arms if (found := collect_arm(run, arm, folds)) is not None}
    repeated = _repeats(run, experiment, class_names)
    repeat_arms = [name for name, _ in repeated.predictions] if repeated else []
    with_predictions = list(dict.fromkeys([*collected, *repeat_arms]))
    if not with_predictions:
        raise FileNotFoundError(f"{run.path}: no finished fold with predictions yet")
    references = list(dict.fromkeys(references or [with_predictions[0]]))  # in order, each once
    missing = [name for name in references if name not in with_predictions]
    if missing:
        raise ValueError(f"reference arm(s) {missing} have no predictions in {run.path}; arms with predictions: "
                         f"{with_predictions}")
    rows, reports = [], {}
    for name, results in collected.items():
        summary = summary_table(results.predictions, class_names, n_boot=experiment.bootstrap, seed=experiment.seed)
        arm = results.arm
        reports[name] = write_report(
            results.arm_dir.path, title=f"{experiment.name}: {name} ({arm.model}, transfer {arm.transfer})",
            summary_table=summary, per_fold_table=per_fold_table(results.predictions, class_names),
            predictions=results.predictions, class_names=class_names, history=_arm_history(results.arm_dir),
            config=config, environment=environment, data_summary=data_summary, comparison_table=None,
            notes=_arm_notes(results, experiment, class_names, notes))
        rows.append(_overview_row(results, summary))
    overview = pd.DataFrame(rows)
    overview.to_csv(run.path / "comparison.csv", index=False)
    comparison = _paired_tests({name: results.predictions for name, results in collected.items()},
                               [name for name in references if name in collected], experiment, class_names)
    if comparison is not None:
        comparison.to_csv(run.path / "paired_tests.csv", index=False)
    extra_tables, extra_plots, repeat_notes = {}, {}, []
    if repeated is not None:
        repeated.tests = repeat_tests(repeated, references, experiment, class_names)
        extra_tables, extra_plots = write_repeat_tables(run, repeated), plot_repeat_metrics(run, repeated)
        repeat_notes = [f"{repeats_of(run, experiment)} repeats of {experiment.folds}-fold CV; the arm reports "
                        "and the tables above the repeats are of repeat 0 (the single-seed analysis)",
                        TESTS_EXPLAINED,
                        *([f"(repeat, fold) jobs not finished, not in these numbers: {'; '.join(repeated.missing)}"]
                          if repeated.missing else [])]
    if collected:
        first = next(iter(collected))
        shown = collected[first].predictions
    else:  # repeat 0 has nothing yet: the ROC of the first repeat that has
        (first, first_repeat), shown = next(iter(repeated.predictions.items()))
        first = f"{first}, repeat {first_repeat}"
    top = write_report(
        run.path, title=f"{experiment.name}: {len(with_predictions)} arm(s), {experiment.folds}-fold patient-level CV",
        summary_table=overview, per_fold_table=None, predictions=shown, class_names=class_names,
        history=None, config=config, environment=environment, data_summary=data_summary, comparison_table=comparison,
        extra_tables=extra_tables, extra_plots=extra_plots,
        notes=[*notes, *repeat_notes,
               f"ROC and confusion matrix shown for the first arm ({first}); each arm's own report is in its folder",
               *[f"{name}: folds not finished {results.missing_folds}" for name, results in collected.items()
                 if results.missing_folds],
               *[f"{name}: {paths['html']}" for name, paths in reports.items()]])
    return {"html": Path(top["html"]), "md": Path(top["md"])}


def _repeats(run: RunDir, experiment: Experiment, class_names: list[str]) -> RepeatResults | None:
    """The repeats' results when the run has more than one repeat, else None."""
    if repeats_of(run, experiment) < 2:
        return None
    return collect_repeats(run, experiment, class_names)


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
