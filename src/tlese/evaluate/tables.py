"""The tables a paper quotes, computed from a predictions table (see docs/architecture.md for its columns).

- `per_fold_table`: one row per fold.
- `summary_table`: per metric, mean ± std over folds, the pooled value and its patient-level bootstrap 95% CI.
- `comparison_table`: models against a reference model on the same cases (paired patient bootstrap; DeLong per
  class one-vs-rest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tlese.evaluate.metrics import (
    PER_CLASS_METRICS,
    SCALAR_METRICS,
    classification_metrics,
    fold_metrics,
    flatten_metrics,
    per_class_key,
    prob_column,
    predictions_to_arrays,
    summarise_folds,
)
from tlese.evaluate.stats import bootstrap_cis, delong_per_class, paired_bootstrap_test


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
            f"pooled ({100 * (1 - alpha):.0f}% CI)": ci.format(),
            "n_boot_used": ci.n_used,
        })
    return pd.DataFrame(rows)


def comparison_table(
    predictions_by_model: dict[str, pd.DataFrame],
    class_names: Sequence[str],
    reference: str,
    n_boot: int = 2000,
    seed: int = 0,
    metrics: Sequence[str] = ("macro_auc", "accuracy", "balanced_accuracy"),
    group_column: str = "patient_id",
) -> pd.DataFrame:
    """Each model against ``reference`` on the same cases: difference, paired patient-bootstrap 95% CI and p-value.

    One row per (model, metric) with ``metric_model, metric_reference, diff, ci_low, ci_high, p_value``; then per
    class an ``auc (<class>)`` row with DeLong's one-vs-rest test, Holm-adjusted over the classes in ``p_holm``.
    DeLong assumes independent cases, so it runs on per-patient mean probabilities (one case per patient and
    target), not on the correlated images; its AUCs are therefore patient-level.
    """
    if reference not in predictions_by_model:
        raise ValueError(f"reference model '{reference}' not among {list(predictions_by_model)}")
    compute = _flat_metrics_fn(class_names)
    reference_predictions = predictions_by_model[reference]
    rows = []
    for model, predictions in predictions_by_model.items():
        if model == reference:
            continue
        for metric in metrics:
            result = paired_bootstrap_test(
                predictions, reference_predictions, lambda frame, metric=metric: compute(frame)[metric],
                group_column=group_column, n_boot=n_boot, seed=seed,
            )
            rows.append({"model": model, "reference": reference, "metric": metric, "test": "paired patient bootstrap",
                         "metric_model": result["metric_a"], "metric_reference": result["metric_b"],
                         "diff": result["diff"], "ci_low": result["ci_low"], "ci_high": result["ci_high"],
                         "p_value": result["p_value"], "p_holm": np.nan})
        id_columns = [column for column in ("patient_id", "side", "view") if column in predictions.columns]
        merged = predictions.merge(reference_predictions, on=[*id_columns, "target"], suffixes=("", "__ref"))
        prob_columns = [prob_column(name) for name in class_names]
        reference_columns = [f"{column}__ref" for column in prob_columns]
        per_patient = merged.groupby([group_column, "target"], as_index=False)[prob_columns + reference_columns].mean()
        y_true, probs_model = predictions_to_arrays(per_patient, class_names)
        probs_reference = per_patient[reference_columns].to_numpy(dtype=float)
        delong = delong_per_class(y_true, probs_model, probs_reference, class_names)
        for row in delong.itertuples(index=False):
            rows.append({"model": model, "reference": reference, "metric": per_class_key("auc", row[0]),
                         "test": "DeLong one-vs-rest, per patient", "metric_model": row.auc_a,
                         "metric_reference": row.auc_b,
                         "diff": row.diff, "ci_low": row.ci_low, "ci_high": row.ci_high, "p_value": row.p_value,
                         "p_holm": row.p_holm})
    return pd.DataFrame(rows)
