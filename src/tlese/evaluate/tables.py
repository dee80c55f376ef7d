"""The tables a paper quotes, computed from a predictions table (see docs/architecture.md for its columns).

- `per_fold_table`: one row per fold.
- `summary_table`: per metric, mean ± std over folds, the pooled value and its patient-level bootstrap 95% CI.
- `comparison_table`: models against a reference model on the same cases (paired patient bootstrap; DeLong per
  class one-vs-rest).
- `overview_row`: one arm's headline numbers from its summary table, for a table of arms side by side.
- `repeat_summary`, `fold_spread`: per arm of a repeated k-fold CV, the spread over repeats and over folds.

Which metrics appear where is declared once, in `tlese.evaluate.metrics.METRICS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tlese.evaluate.metrics import (
    HEADLINE_METRICS,
    METRICS,
    PER_CLASS_METRICS,
    PRIMARY_METRIC,
    SCALAR_METRICS,
    classification_metrics,
    flatten_metrics,
    fold_metrics,
    per_class_key,
    predictions_to_arrays,
    prob_column,
    summarise_folds,
)
from tlese.evaluate.stats import align_pair, bootstrap_cis, delong_per_class, paired_bootstrap_test


def _metric_order(class_names: Sequence[str]) -> list[str]:
    per_class = [per_class_key(metric, name) for metric in PER_CLASS_METRICS for name in class_names]
    return [*SCALAR_METRICS, *per_class]


def _flat_metrics_fn(class_names: Sequence[str]):
    def compute(frame: pd.DataFrame) -> dict[str, float]:
        return flatten_metrics(classification_metrics(*predictions_to_arrays(frame, class_names), class_names))

    return compute


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.818 ± 0.021"``; the std is omitted when undefined (one fold)."""
    if not np.isfinite(mean):
        return "NaN"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def per_fold_table(predictions: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per fold: ``fold, n`` and every metric (global, then per class), NaN where undefined."""
    folds = fold_metrics(predictions, class_names)
    rows = [{"fold": fold["fold"], "n": fold["n"], **flatten_metrics(fold)} for fold in folds]
    return pd.DataFrame(rows, columns=["fold", "n", *_metric_order(class_names)])


def fold_warnings(predictions: pd.DataFrame, class_names: Sequence[str]) -> list[str]:
    """The warnings of every fold (e.g. "fold 3: class 'HER2-enriched' is absent ...")."""
    return [note for fold in fold_metrics(predictions, class_names) for note in fold["warnings"]]


def _ci_column(alpha: float) -> str:
    return f"pooled ({100 * (1 - alpha):.0f}% CI)"


def summary_table(
    predictions: pd.DataFrame,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    group_column: str = "patient_id",
) -> pd.DataFrame:
    """Per metric: mean ± std over folds, the pooled value (all folds' predictions together) and its bootstrap CI.

    Columns: ``metric, mean, std, n_folds, mean ± std, pooled, ci_low, ci_high, pooled (CI), n_boot_used``.
    The CI resamples patients (``group_column``) from the pooled predictions; ``n_boot_used`` counts the resamples
    where the metric was defined. Without a ``fold`` column, the fold columns are NaN.
    """
    order = _metric_order(class_names)
    if "fold" in predictions.columns:
        by_fold = summarise_folds(fold_metrics(predictions, class_names))
    else:
        by_fold = {}
    cis = bootstrap_cis(predictions, _flat_metrics_fn(class_names), group_column, n_boot, seed, alpha)
    rows = []
    for metric in order:
        fold_summary = by_fold.get(metric, {"mean": np.nan, "std": np.nan, "n_folds": 0})
        ci = cis[metric]
        rows.append({
            "metric": metric,
            "mean": fold_summary["mean"],
            "std": fold_summary["std"],
            "n_folds": fold_summary["n_folds"],
            "mean ± std": format_mean_std(fold_summary["mean"], fold_summary["std"]),
            "pooled": ci.point,
            "ci_low": ci.low,
            "ci_high": ci.high,
            _ci_column(alpha): ci.format(),
            "n_boot_used": ci.n_used,
        })
    return pd.DataFrame(rows)


def overview_row(summary: pd.DataFrame) -> dict[str, str]:
    """One arm's row of an overview of arms, from its `summary_table`, following the metric registry.

    Columns: ``"<label> (mean ± std)"`` for each of `HEADLINE_METRICS` in registry order (e.g. ``"macro AUC (mean ±
    std)"``), then ``"pooled <label> (95% CI)"`` for `PRIMARY_METRIC` (the summary's CI level).
    """
    table = summary.set_index("metric")
    missing = [name for name in HEADLINE_METRICS if name not in table.index]
    ci_columns = [column for column in table.columns if str(column).startswith("pooled (")]
    if missing or not ci_columns or "mean ± std" not in table.columns:
        raise ValueError(f"not a summary_table: lacks metrics {missing} or its 'mean ± std' / 'pooled (CI)' columns")
    row = {f"{METRICS[name].label} (mean ± std)": table.loc[name, "mean ± std"] for name in HEADLINE_METRICS}
    level = ci_columns[0].removeprefix("pooled ")
    row[f"pooled {METRICS[PRIMARY_METRIC].label} {level}"] = table.loc[PRIMARY_METRIC, ci_columns[0]]
    return row


def comparison_table(
    predictions_by_model: dict[str, pd.DataFrame],
    class_names: Sequence[str],
    reference: str,
    n_boot: int = 2000,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    group_column: str = "patient_id",
    drop_unmatched: bool = False,
) -> pd.DataFrame:
    """Each model against ``reference`` on the same cases: difference, paired patient-bootstrap 95% CI and p-value.

    One row per (model, metric) with ``metric_model, metric_reference, diff, ci_low, ci_high, p_value``; then per
    class an ``auc (<class>)`` row with DeLong's one-vs-rest test, Holm-adjusted over the classes in ``p_holm``.
    ``metrics`` defaults to `HEADLINE_METRICS`, the primary one first. Rows are matched per unit (image or breast)
    by `tlese.evaluate.stats.align_pair`; ``n_units`` says how many units (DeLong: patient cases) a test used and
    ``n_dropped`` how many only one model had (an error unless ``drop_unmatched``).
    DeLong assumes independent cases, so it runs on per-patient mean probabilities (one case per patient and
    target), not on the correlated images; its AUCs are therefore patient-level.
    """
    if reference not in predictions_by_model:
        raise ValueError(f"reference model '{reference}' not among {list(predictions_by_model)}")
    if metrics is None:
        metrics = sorted(HEADLINE_METRICS, key=lambda name: name != PRIMARY_METRIC)
    unknown = [name for name in metrics if name not in _metric_order(class_names)]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {_metric_order(class_names)}")
    compute = _flat_metrics_fn(class_names)
    prob_columns = [prob_column(name) for name in class_names]
    reference_columns = [f"{column}__ref" for column in prob_columns]
    rows = []
    for model, predictions in predictions_by_model.items():
        if model == reference:
            continue
        pair = align_pair(predictions, predictions_by_model[reference], drop_unmatched=drop_unmatched)
        counts = {"n_units": pair.n_units, "n_dropped": pair.n_only_a + pair.n_only_b}
        for metric in metrics:
            result = paired_bootstrap_test(
                pair.a, pair.b, lambda frame, metric=metric: compute(frame)[metric],
                group_column=group_column, n_boot=n_boot, seed=seed,
            )
            rows.append({"model": model, "reference": reference, "metric": metric, "test": "paired patient bootstrap",
                         "metric_model": result["metric_a"], "metric_reference": result["metric_b"],
                         "diff": result["diff"], "ci_low": result["ci_low"], "ci_high": result["ci_high"],
                         "p_value": result["p_value"], "p_holm": np.nan, **counts})
        # The aligned rows are the same units in the same order, so the reference's probabilities sit beside them.
        both = pair.a[[group_column, "target", *prob_columns]].assign(
            **dict(zip(reference_columns, pair.b[prob_columns].to_numpy(dtype=float).T)))
        per_patient = both.groupby([group_column, "target"], as_index=False)[prob_columns + reference_columns].mean()
        y_true, probs_model = predictions_to_arrays(per_patient, class_names)
        probs_reference = per_patient[reference_columns].to_numpy(dtype=float)
        delong = delong_per_class(y_true, probs_model, probs_reference, class_names)
        for row in delong.itertuples(index=False):
            rows.append({"model": model, "reference": reference, "metric": per_class_key("auc", row[0]),
                         "test": "DeLong one-vs-rest, per patient", "metric_model": row.auc_a,
                         "metric_reference": row.auc_b,
                         "diff": row.diff, "ci_low": row.ci_low, "ci_high": row.ci_high, "p_value": row.p_value,
                         "p_holm": row.p_holm, "n_units": len(per_patient), "n_dropped": counts["n_dropped"]})
    return pd.DataFrame(rows)


def _check_columns(table: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}; it has {list(table.columns)}")


def repeat_summary(per_repeat: pd.DataFrame, metric_columns: Sequence[str]) -> pd.DataFrame:
    """Per arm of a repeated k-fold CV, each metric over its repeats (one row per ``arm, repeat``, the metric pooled
    out of fold for that repeat): how far another seed and another partition can move the result.

    One row per arm (in order of appearance): ``arm, n_repeats`` and per metric ``"<metric> (mean ± sd)"``,
    ``<metric> mean``, ``<metric> sd`` (ddof=1, NaN with one repeat), ``<metric> min``, ``<metric> max``. A repeat
    where a metric is NaN (undefined) counts in ``n_repeats`` but not in that metric's numbers.
    """
    _check_columns(per_repeat, ["arm", "repeat", *metric_columns], "per_repeat")
    duplicated = per_repeat.duplicated(["arm", "repeat"])
    if duplicated.any():
        pairs = list(per_repeat.loc[duplicated, ["arm", "repeat"]].itertuples(index=False, name=None))
        raise ValueError(f"per_repeat has more than one row for (arm, repeat) {pairs[:5]}")
    rows = []
    for arm, group in per_repeat.groupby("arm", sort=False):
        row = {"arm": arm, "n_repeats": len(group)}
        for metric in metric_columns:
            values = group[metric].astype(float)
            mean, sd = values.mean(), values.std(ddof=1)  # both skip NaN; sd is NaN below two values
            row.update({f"{metric} (mean ± sd)": format_mean_std(mean, sd), f"{metric} mean": mean,
                        f"{metric} sd": sd, f"{metric} min": values.min(), f"{metric} max": values.max()})
        rows.append(row)
    columns = ["arm", "n_repeats"] + [f"{metric} {part}" for metric in metric_columns
                                      for part in ("(mean ± sd)", "mean", "sd", "min", "max")]
    return pd.DataFrame(rows, columns=columns)


def fold_spread(per_fold: pd.DataFrame, metric_columns: Sequence[str]) -> pd.DataFrame:
    """Per arm, the spread of fold-level scores (one row per ``arm, repeat, fold``).

    One row per arm: ``arm, n_repeats, n_folds`` (all (repeat, fold) rows) and per metric ``<metric> fold sd`` (sd
    of all fold scores pooled over repeats) and ``<metric> within-repeat fold sd`` (the mean over repeats of the sd
    of that repeat's folds; repeats with one defined fold are skipped). Both ddof=1, NaN where fewer than 2 scores.
    """
    _check_columns(per_fold, ["arm", "repeat", "fold", *metric_columns], "per_fold")
    rows = []
    for arm, group in per_fold.groupby("arm", sort=False):
        row = {"arm": arm, "n_repeats": group["repeat"].nunique(), "n_folds": len(group)}
        for metric in metric_columns:
            values = group[metric].astype(float)
            within = values.groupby(group["repeat"]).std(ddof=1)
            row.update({f"{metric} fold sd": values.std(ddof=1), f"{metric} within-repeat fold sd": within.mean()})
        rows.append(row)
    columns = ["arm", "n_repeats", "n_folds"] + [f"{metric} {part}" for metric in metric_columns
                                                 for part in ("fold sd", "within-repeat fold sd")]
    return pd.DataFrame(rows, columns=columns)
