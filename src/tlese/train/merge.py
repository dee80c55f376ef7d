"""Aggregate the finished folds of a run: checks against the run's records, metrics, comparison between arms, reports.

The run is read through `tlese.train.runs.FinishedRun`, which checks every finished fold before a number is computed:
its predictions hold exactly its test patients of the run's fold file (each unit once, none missing), its split agrees
with the fold file, and all folds of an arm were made from the same settings. A fold not finished yet is named in the
report, never silently left out. (`collect_arm` and `ArmResults` live in `tlese.train.runs`; importable here too.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tlese.train.config import Experiment
from tlese.train.engine import read_history
from tlese.train.repeats import (
    TESTS_EXPLAINED,
    collect_repeats,
    plot_repeat_metrics,
    repeat_tests,
    write_repeat_tables,
)
from tlese.train.rundir import ArmDir
from tlese.train.runs import ArmResults, FinishedRun, collect_arm

__all__ = ["ArmResults", "collect_arm", "merge_run"]


def _arm_history(arm_dir: ArmDir) -> pd.DataFrame | None:
    frames = []
    for stage, fold in [(arm_dir.stage1, ""), *((fold_dir, str(fold_dir.fold)) for fold_dir in arm_dir.folds())]:
        history = read_history(stage.path)
        if len(history):
            frames.append(history.assign(stage="cxr" if fold == "" else "target", fold=fold))
    return pd.concat(frames, ignore_index=True) if frames else None


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
    from tlese.evaluate.report import write_report
    from tlese.evaluate.tables import per_fold_table, summary_table

    run = FinishedRun(run_dir)
    experiment, config, environment, notes = run.experiment, run.config, run.environment, run.notes()
    data_summary = run.data_summary()
    class_names = run.class_names
    if run.folds() is None:
        raise FileNotFoundError(f"{run.folds_file()}: the run's fold file is missing; predictions cannot be checked")

    collected = {arm.name: found for arm in run.arms if (found := run.predictions(arm.name)) is not None}
    repeated = collect_repeats(run) if run.repeats > 1 else None
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
        repeat_notes = [f"{run.repeats} repeats of {experiment.folds}-fold CV; the arm reports "
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
