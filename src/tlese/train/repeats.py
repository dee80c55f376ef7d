"""Merging a repeated k-fold CV: per arm the metric of each repeat, their spread, and tests that survive the seed.

Each finished (repeat, fold) job is checked as a single CV's folds are (`FinishedRun.predictions`, against that
repeat's fold file). Per arm and repeat the out-of-fold predictions are pooled into one metric; over repeats they give
mean ± sd (how far one seed can move the result). Between arms, two tests answer two questions:
- the corrected resampled t-test (Nadeau & Bengio 2003; Bouckaert & Frank 2004) over the r x k fold scores: would the
  difference hold for another draw of training data and training randomness (the variance over repeats included)?
- the paired patient bootstrap, per repeat: are these patients' predictions by one trained pair of arms different?
A (repeat, fold) job not finished is named, and the rest is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tlese.train.config import Experiment
from tlese.train.rundir import repeat_seed
from tlese.train.runs import FinishedRun

TESTS_EXPLAINED = (
    "Corrected resampled t-test (Nadeau & Bengio 2003; Bouckaert & Frank 2004): the r x k fold-level differences "
    "between two arms, their variance inflated by n_test/n_train because the folds' training sets overlap; it asks "
    "whether the difference would hold for another draw of training data and seed. Paired patient bootstrap (per "
    "repeat): the same patients' pooled out-of-fold predictions resampled by patient; it asks whether the two trained "
    "arms differ on these patients, with that repeat's seed fixed, so it can be significant in one repeat and not in "
    "the next. Holm: over the arm pairs tested, per metric."
)


@dataclass
class RepeatResults:
    """Everything merge shows about the repeats of a run."""

    per_repeat: pd.DataFrame  # arm, repeat, seed, folds, complete, <metric>... (pooled out of fold)
    per_fold: pd.DataFrame  # arm, repeat, fold, n, <metric>..., n_train, n_test
    summary: pd.DataFrame  # per arm: mean ± sd over complete repeats
    spread: pd.DataFrame  # per arm: fold-level spread
    tests: pd.DataFrame | None  # corrected t-test and per-repeat bootstrap rows
    missing: list[str] = field(default_factory=list)  # "arm: repeat i fold k" not finished
    predictions: dict[tuple[str, int], pd.DataFrame] = field(default_factory=dict)


def collect_repeats(run: FinishedRun) -> RepeatResults:
    """Check and gather every finished (repeat, fold) of every arm, with metrics per repeat and per fold."""
    from tlese.evaluate.metrics import HEADLINE_METRICS, classification_metrics, flatten_metrics, predictions_to_arrays
    from tlese.evaluate.tables import fold_spread, per_fold_table, repeat_summary

    experiment, class_names = run.experiment, run.class_names
    metrics = list(HEADLINE_METRICS)
    repeat_rows, fold_rows, missing, predictions = [], [], [], {}
    for repeat in range(run.repeats):
        for arm in run.arms:
            results = run.predictions(arm.name, repeat)
            if results is None:
                missing.append(f"{arm.name}: repeat {repeat} (no finished fold)")
                continue
            missing += [f"{arm.name}: repeat {repeat} fold {fold}" for fold in results.missing_folds]
            predictions[(arm.name, repeat)] = results.predictions
            pooled = flatten_metrics(classification_metrics(*predictions_to_arrays(results.predictions, class_names),
                                                            class_names))
            repeat_rows.append({"arm": arm.name, "repeat": repeat, "seed": repeat_seed(experiment.seed, repeat),
                                "folds": int(results.predictions["fold"].nunique()),
                                "complete": not results.missing_folds, **{name: pooled[name] for name in metrics}})
            sizes = {record["fold"]: (record["train_patients"] + record["val_patients"], record["test_patients"])
                     for record in results.records}
            table = per_fold_table(results.predictions, class_names)
            for row in table.itertuples(index=False):
                n_train, n_test = sizes[int(row.fold)]
                fold_rows.append({"arm": arm.name, "repeat": repeat, "fold": int(row.fold), "n": int(row.n),
                                  **{name: getattr(row, name) for name in metrics},
                                  "n_train": n_train, "n_test": n_test})
    per_repeat = pd.DataFrame(repeat_rows, columns=["arm", "repeat", "seed", "folds", "complete", *metrics])
    per_fold = pd.DataFrame(fold_rows, columns=["arm", "repeat", "fold", "n", *metrics, "n_train", "n_test"])
    # A repeat with folds missing pools fewer patients: its metric is shown, not averaged with the complete ones
    # (unless the arm has no complete repeat yet).
    has_complete = per_repeat.groupby("arm")["complete"].transform("any")
    summary = repeat_summary(per_repeat[per_repeat["complete"] | ~has_complete.astype(bool)], metrics)
    spread = fold_spread(per_fold, metrics) if len(per_fold) else pd.DataFrame()
    return RepeatResults(per_repeat, per_fold, summary, spread, None, missing, predictions)


def repeat_tests(results: RepeatResults, references: list[str], experiment: Experiment,
                 class_names: list[str]) -> pd.DataFrame | None:
    """Every arm against each reference (a pair once): the corrected resampled t-test over the (repeat, fold) scores
    both arms have, and the paired patient bootstrap within each repeat; Holm over pairs per metric and test."""
    from tlese.evaluate.metrics import HEADLINE_METRICS, PRIMARY_METRIC
    from tlese.evaluate.stats import corrected_resampled_ttest, holm_adjust
    from tlese.evaluate.tables import comparison_table

    metrics = sorted(HEADLINE_METRICS, key=lambda name: name != PRIMARY_METRIC)
    arms = list(dict.fromkeys(results.per_fold["arm"]))
    pairs = []
    for index, reference in enumerate(references):
        pairs += [(arm, reference) for arm in arms if arm != reference and arm not in references[:index]
                  and reference in arms]
    rows = []
    for arm, reference in pairs:
        scores = {name: results.per_fold[results.per_fold["arm"] == name].set_index(["repeat", "fold"])
                  for name in (arm, reference)}
        for metric in metrics:
            a, b = scores[arm][metric].dropna(), scores[reference][metric].dropna()
            units = a.index.intersection(b.index)
            if len(units) < 2:
                continue
            test = corrected_resampled_ttest(a.loc[units], b.loc[units],
                                             n_train=scores[arm].loc[units, "n_train"].to_numpy(dtype=float),
                                             n_test=scores[arm].loc[units, "n_test"].to_numpy(dtype=float))
            rows.append({"model": arm, "reference": reference, "metric": metric, "repeat": "all",
                         "test": "corrected resampled t-test", "metric_model": float(a.loc[units].mean()),
                         "metric_reference": float(b.loc[units].mean()), "diff": test["mean_difference"],
                         "ci_low": test["ci_low"], "ci_high": test["ci_high"], "p_value": test["p"],
                         "naive_p": test["naive_p"], "n_units": len(units),
                         "n_dropped": len(a.index.symmetric_difference(b.index))})
        for repeat in sorted({repeat for name, repeat in results.predictions if name == arm}):
            if (reference, repeat) not in results.predictions:
                continue
            table = comparison_table({arm: results.predictions[(arm, repeat)],
                                      reference: results.predictions[(reference, repeat)]}, class_names,
                                     reference=reference, n_boot=max(experiment.bootstrap, 200),
                                     seed=repeat_seed(experiment.seed, repeat), metrics=metrics,
                                     drop_unmatched=True)
            table = table[table["test"] == "paired patient bootstrap"]
            rows += [{**row, "repeat": repeat} for row in table.drop(columns=["p_holm"]).to_dict("records")]
    if not rows:
        return None
    tests = pd.DataFrame(rows)
    tests["p_holm_pairs"] = np.nan
    for _, group in tests.groupby(["test", "metric", "repeat"]):
        tests.loc[group.index, "p_holm_pairs"] = holm_adjust(group["p_value"].to_numpy(dtype=float))
    columns = ["model", "reference", "metric", "test", "repeat", "metric_model", "metric_reference", "diff",
               "ci_low", "ci_high", "p_value", "p_holm_pairs", "naive_p", "n_units", "n_dropped"]
    return tests.reindex(columns=columns)


def write_repeat_tables(run: FinishedRun, results: RepeatResults) -> dict[str, pd.DataFrame]:
    """repeats.csv, repeat_summary.csv, repeat_folds.csv, repeat_tests.csv beside the run's report; returns the
    report's tables by heading."""
    results.per_repeat.to_csv(run.path / "repeats.csv", index=False)
    results.summary.to_csv(run.path / "repeat_summary.csv", index=False)
    results.per_fold.to_csv(run.path / "repeat_folds.csv", index=False)
    # The report shows mean ± sd and the range; the CSV keeps every column at full precision.
    shown = results.summary[["arm", "n_repeats", *[column for column in results.summary.columns
                                                   if column.endswith("(mean ± sd)")]]].copy()
    for metric in [column.removesuffix(" (mean ± sd)") for column in shown.columns[2:]]:
        shown[f"{metric} range"] = [f"{low:.3f}-{high:.3f}" for low, high in
                                    zip(results.summary[f"{metric} min"], results.summary[f"{metric} max"])]
    tables = {"Repeats: mean ± sd over repeats (pooled out-of-fold metric of each repeat)": shown,
              "Repeats: each repeat's pooled metric": results.per_repeat}
    if len(results.spread):
        tables["Repeats: fold-level spread"] = results.spread
    if results.tests is not None:
        results.tests.to_csv(run.path / "repeat_tests.csv", index=False)
        tables["Repeats: tests between arms"] = results.tests
    return tables


def plot_repeat_metrics(run: FinishedRun, results: RepeatResults) -> dict[str, object]:
    """One strip plot per headline metric: each repeat a point, mean ± sd beside it."""
    from tlese.evaluate.metrics import HEADLINE_METRICS, METRICS
    from tlese.evaluate.report import PLOTS_DIR, plot_repeats

    plots = {}
    for metric in HEADLINE_METRICS:
        path = run.path / PLOTS_DIR / f"repeats_{metric}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plots[f"Repeats: {METRICS[metric].label} of each repeat"] = plot_repeats(
            results.per_repeat, metric, path, title=f"{METRICS[metric].label}: one point per repeat (seed)")
    return plots
