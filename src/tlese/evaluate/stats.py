"""Uncertainty and model comparison: patient-level (cluster) bootstrap, DeLong's test, paired bootstrap test, and the
corrected resampled t-test over the folds of a repeated k-fold cross-validation.

Why patient-level: a patient contributes several images (two views, two breasts) whose predictions are correlated;
resampling images as if independent gives confidence intervals that are too narrow. `bootstrap_ci` and
`paired_bootstrap_test` therefore resample patients with replacement and keep all rows of each drawn patient.
DeLong's test assumes independent cases: apply it to one row per patient (or per breast, accepting mild
within-patient correlation), or use `paired_bootstrap_test` on image-level predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t

from tlese.evaluate.metrics import check_unique_units, unit_key_columns

MetricFn = Callable[[pd.DataFrame], float]


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with a percentile bootstrap interval; unpacks as ``point, low, high``.

    ``n_used`` of ``n_boot`` resamples gave a finite metric (the others, e.g. a resample without any positive case
    for an AUC, were skipped); report it when it is well below ``n_boot``.
    """

    point: float
    low: float
    high: float
    n_used: int
    n_boot: int
    alpha: float = 0.05

    def __iter__(self):
        return iter((self.point, self.low, self.high))

    def format(self, digits: int = 3) -> str:
        """E.g. ``"0.883 (0.851-0.912)"``."""
        if not np.isfinite(self.point):
            return "NaN"
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return f"{self.point:.{digits}f}"
        return f"{self.point:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


class _ClusterResampler:
    """Draws bootstrap samples of whole groups (patients): row indices of the drawn groups, concatenated."""

    def __init__(self, groups: pd.Series, seed: int):
        codes, _ = pd.factorize(groups, sort=True)
        if (codes < 0).any():
            raise ValueError(f"the group column '{groups.name}' has missing values")
        order = np.argsort(codes, kind="stable")
        self.sizes = np.bincount(codes)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.rows_by_group = order  # rows of group g are rows_by_group[starts[g]:starts[g] + sizes[g]]
        self.n_groups = len(self.sizes)
        self.rng = np.random.default_rng(seed)

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, new cluster id for each row): a patient drawn twice counts as two distinct patients."""
        drawn = self.rng.integers(0, self.n_groups, size=self.n_groups)
        sizes = self.sizes[drawn]
        # Offsets inside each drawn group, vectorised: position - start of its block in the output.
        block_starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
        offsets = np.arange(sizes.sum()) - block_starts
        rows = self.rows_by_group[np.repeat(self.starts[drawn], sizes) + offsets]
        return rows, np.repeat(np.arange(self.n_groups), sizes)


def _resample(df: pd.DataFrame, rows: np.ndarray, cluster_ids: np.ndarray, group_column: str) -> pd.DataFrame:
    sample = df.iloc[rows].reset_index(drop=True)
    # Relabel so a metric that aggregates per patient treats duplicated draws as separate patients.
    sample[group_column] = cluster_ids
    return sample


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    df: pd.DataFrame,
    metric_fn: MetricFn,
    group_column: str = "patient_id",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapCI:
    """Percentile confidence interval of ``metric_fn(df)`` by resampling groups (patients) with replacement.

    Resamples where the metric is NaN are skipped (see ``BootstrapCI.n_used``). To resample images instead of
    patients (not recommended for clustered data), pass a column that is unique per row.
    """
    results = bootstrap_cis(df, lambda frame: {"metric": metric_fn(frame)}, group_column, n_boot, seed, alpha)
    return results["metric"]


def bootstrap_cis(
    df: pd.DataFrame,
    metrics_fn: Callable[[pd.DataFrame], dict[str, float]],
    group_column: str = "patient_id",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, BootstrapCI]:
    """`bootstrap_ci` for several metrics computed together (``metrics_fn`` returns ``{name: value}``).

    All metrics share the same resamples, which is both faster and consistent across the rows of a table.
    """
    if group_column not in df.columns:
        raise ValueError(f"cannot bootstrap by '{group_column}': no such column in {list(df.columns)}")
    points = {name: float(value) for name, value in metrics_fn(df).items()}
    resampler = _ClusterResampler(df[group_column], seed)
    draws = {name: [] for name in points}
    for _ in range(n_boot):
        values = metrics_fn(_resample(df, *resampler.draw(), group_column))
        for name in points:
            draws[name].append(values.get(name, np.nan))
    results = {}
    for name, point in points.items():
        values = np.asarray(draws[name], dtype=float)
        values = values[np.isfinite(values)]
        low, high = _percentile_interval(values, alpha)
        results[name] = BootstrapCI(point, low, high, n_used=int(values.size), n_boot=n_boot, alpha=alpha)
    return results


@dataclass(frozen=True)
class AlignedPair:
    """Two prediction tables restricted to the units they share, row i of ``a`` and of ``b`` being the same unit."""

    a: pd.DataFrame
    b: pd.DataFrame
    key: tuple[str, ...]  # the `unit_key_columns` the rows were matched on
    n_only_a: int  # units dropped because only A had them (0 unless ``drop_unmatched``)
    n_only_b: int

    @property
    def n_units(self) -> int:
        return len(self.a)

    def describe(self) -> str:
        """E.g. ``"120 units matched on ['patient_id', 'image_id'] (3 only in A and 0 only in B dropped)"``."""
        dropped = self.n_only_a + self.n_only_b
        detail = f" ({self.n_only_a} only in A and {self.n_only_b} only in B dropped)" if dropped else ""
        return f"{self.n_units} units matched on {list(self.key)}{detail}"


def _counted(keys: set[str], where: str, count: int = 3) -> str:
    """E.g. ``"2 only in A (e.g. (P3, images/P3_0.png), (P3, images/P3_1.png))"``."""
    examples = ", ".join(f"({key.replace(chr(0x1F), ', ')})" for key in sorted(keys)[:count])
    return f"{len(keys)} only in {where}" + (f" (e.g. {examples})" if keys else "")


def align_pair(df_a: pd.DataFrame, df_b: pd.DataFrame, drop_unmatched: bool = False) -> AlignedPair:
    """Match the rows of two prediction tables on their unit key (`unit_key_columns`), in the same order.

    Each table must have one row per unit (else a ValueError names the duplicated key). Units that only one table
    has are an error unless ``drop_unmatched``, which keeps the common ones and warns how many were dropped (e.g.
    an arm with fewer finished folds). The targets of matched rows must agree.
    """
    key = unit_key_columns(df_a, df_b)
    keys_a = check_unique_units(df_a, key, "predictions of model A")
    keys_b = check_unique_units(df_b, key, "predictions of model B")
    only_a, only_b = set(keys_a) - set(keys_b), set(keys_b) - set(keys_a)
    common = len(keys_a) - len(only_a)
    if only_a or only_b:
        counts = f"{common} units matched on {key}, {_counted(only_a, 'A')}, {_counted(only_b, 'B')}"
        if not drop_unmatched or common == 0:
            advice = "" if common == 0 else ", or pass drop_unmatched=True to test on the common ones"
            raise ValueError(f"the two prediction sets do not cover the same cases: {counts}; compare the models "
                             f"on the same cases{advice}")
        warnings.warn(f"paired comparison restricted to the common units: {counts}", stacklevel=2)
    keep_a, keep_b = ~keys_a.isin(only_a).to_numpy(), ~keys_b.isin(only_b).to_numpy()
    aligned_a = df_a[keep_a].set_index(keys_a[keep_a].to_numpy()).sort_index().reset_index(drop=True)
    aligned_b = df_b[keep_b].set_index(keys_b[keep_b].to_numpy()).sort_index().reset_index(drop=True)
    if "target" in aligned_a.columns and "target" in aligned_b.columns:
        disagree = int((aligned_a["target"].to_numpy() != aligned_b["target"].to_numpy()).sum())
        if disagree:
            raise ValueError(f"the two prediction sets disagree on the target of {disagree} cases (matched on {key})")
    return AlignedPair(aligned_a, aligned_b, tuple(key), len(only_a), len(only_b))


def paired_bootstrap_test(
    df_a: pd.DataFrame,
    df_b: pd.DataFrame,
    metric_fn: MetricFn,
    group_column: str = "patient_id",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    drop_unmatched: bool = False,
) -> dict:
    """Difference ``metric(A) - metric(B)`` of two models on the same cases, with a patient-level paired bootstrap.

    Rows are matched by `align_pair` on the unit key (patient_id, side, view, image_id where present; the fold
    column is not used: the models may come from different fold assignments). Each resample draws patients once
    and evaluates both models on the same rows, so the correlation between the models is kept. The two-sided
    p-value inverts the percentile interval: ``p = 2 * min(P*(diff <= 0), P*(diff >= 0))`` with a +1 correction so
    it is never reported as exactly 0.

    Returns ``metric_a, metric_b, diff, ci_low, ci_high, p_value, n_used, n_boot``, and ``n_units, n_patients,
    n_dropped`` (units only one table had, dropped with ``drop_unmatched``), ``unit_key``.
    """
    pair = align_pair(df_a, df_b, drop_unmatched=drop_unmatched)
    aligned_a, aligned_b = pair.a, pair.b
    if group_column not in aligned_a.columns:
        raise ValueError(f"cannot bootstrap by '{group_column}': no such column")
    metric_a, metric_b = float(metric_fn(aligned_a)), float(metric_fn(aligned_b))
    resampler = _ClusterResampler(aligned_a[group_column], seed)
    diffs = []
    for _ in range(n_boot):
        rows, cluster_ids = resampler.draw()
        diffs.append(
            metric_fn(_resample(aligned_a, rows, cluster_ids, group_column))
            - metric_fn(_resample(aligned_b, rows, cluster_ids, group_column))
        )
    diffs = np.asarray(diffs, dtype=float)
    diffs = diffs[np.isfinite(diffs)]
    low, high = _percentile_interval(diffs, alpha)
    if diffs.size:
        tail = min((diffs <= 0).sum(), (diffs >= 0).sum())
        p_value = min(1.0, 2 * (tail + 1) / (diffs.size + 1))
    else:
        p_value = float("nan")
    return {
        "metric_a": metric_a,
        "metric_b": metric_b,
        "diff": metric_a - metric_b,
        "ci_low": low,
        "ci_high": high,
        "p_value": float(p_value),
        "n_used": int(diffs.size),
        "n_boot": n_boot,
        "n_units": pair.n_units,
        "n_patients": int(resampler.n_groups),
        "n_dropped": pair.n_only_a + pair.n_only_b,
        "unit_key": list(pair.key),
    }


# ---------------------------------------------------------------------------------------------------------------
# DeLong (1988) with the fast O(n log n) algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389).


def _binary_labels(y_true) -> np.ndarray:
    y_true = np.asarray(y_true).ravel()
    values = np.unique(y_true)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"DeLong needs binary labels 0/1; got values {values.tolist()}")
    y_true = y_true.astype(bool)
    if y_true.all() or not y_true.any():
        raise ValueError("DeLong needs both positive and negative cases; AUC is undefined with one class")
    return y_true


def _fast_delong(scores: np.ndarray, is_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their covariance matrix for score sets ``scores`` (shape ``(n_models, n_cases)``).

    Sun & Xu's Theorem 1: with midranks (ties share the average rank) over all cases ``T_Z``, within positives
    ``T_X`` and within negatives ``T_Y``, DeLong's structural components are
    ``V10_i = (T_Z(x_i) - T_X(x_i)) / n`` (fraction of negatives below positive i, ties counting 1/2) and
    ``V01_j = 1 - (T_Z(y_j) - T_Y(y_j)) / m``; the AUC is their mean and
    ``Cov = S10 / m + S01 / n`` with S the sample covariances (ddof=1) of the components.
    """
    positives, negatives = scores[:, is_positive], scores[:, ~is_positive]
    m, n = positives.shape[1], negatives.shape[1]
    ranks_all = rankdata(scores, method="average", axis=1)  # midranks
    ranks_pos = rankdata(positives, method="average", axis=1)
    ranks_neg = rankdata(negatives, method="average", axis=1)
    v10 = (ranks_all[:, is_positive] - ranks_pos) / n
    v01 = 1.0 - (ranks_all[:, ~is_positive] - ranks_neg) / m
    aucs = v10.mean(axis=1)
    # np.cov of a single sample is NaN (ddof=1): with one positive (or negative) its term contributes 0 variance.
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(scores), len(scores)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(scores), len(scores)))
    return aucs, s10 / m + s01 / n


def delong_roc_variance(y_true, scores) -> tuple[float, float]:
    """``(auc, variance)`` of one binary ROC AUC by DeLong's method (fast algorithm, midranks for ties)."""
    is_positive = _binary_labels(y_true)
    scores = np.asarray(scores, dtype=float).reshape(1, -1)
    if scores.shape[1] != is_positive.size:
        raise ValueError(f"{scores.shape[1]} scores for {is_positive.size} labels")
    aucs, covariance = _fast_delong(scores, is_positive)
    return float(aucs[0]), float(covariance[0, 0])


def delong_test(y_true, scores_a, scores_b, alpha: float = 0.05) -> dict:
    """DeLong's paired test of two correlated ROC AUCs (two models scoring the same cases).

    Returns ``auc_a, auc_b, diff`` (a - b), ``se_diff``, ``z``, two-sided ``p_value``, ``ci_diff`` (Wald interval
    at ``1 - alpha``), ``n_positive, n_negative``. Identical scores give ``z = 0, p = 1``.
    """
    is_positive = _binary_labels(y_true)
    scores = np.vstack([np.asarray(scores_a, dtype=float).ravel(), np.asarray(scores_b, dtype=float).ravel()])
    if scores.shape[1] != is_positive.size:
        raise ValueError(f"scores of length {scores.shape[1]} for {is_positive.size} labels")
    aucs, covariance = _fast_delong(scores, is_positive)
    diff = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    if se > 0:
        z = diff / se
        p_value = float(2 * norm.sf(abs(z)))
    else:
        # Zero variance of the difference: the AUCs move together exactly (e.g. identical or perfectly separating
        # scores); no evidence of a difference when they are equal, undefined otherwise.
        z, p_value = (0.0, 1.0) if diff == 0 else (float("nan"), float("nan"))
    half_width = float(norm.ppf(1 - alpha / 2)) * se
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se_diff": se,
        "z": float(z),
        "p_value": p_value,
        "ci_diff": (diff - half_width, diff + half_width),
        "n_positive": int(is_positive.sum()),
        "n_negative": int((~is_positive).sum()),
    }


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone); NaNs stay NaN and do not count as tests."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    finite = np.flatnonzero(np.isfinite(p_values))
    order = finite[np.argsort(p_values[finite], kind="stable")]
    running_max = 0.0
    for position, index in enumerate(order):
        running_max = max(running_max, (len(order) - position) * p_values[index])
        adjusted[index] = min(1.0, running_max)
    return adjusted


def delong_per_class(y_true, probs_a, probs_b, class_names: Sequence[str], alpha: float = 0.05) -> pd.DataFrame:
    """One-vs-rest DeLong test per class between two models (probabilities ``(n, K)`` each, same cases).

    Adds Holm-adjusted p-values across the classes tested. A class absent from ``y_true`` (or the only class) gets
    NaN statistics and a ``note`` instead of an error.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    probs_a, probs_b = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    rows = []
    for k, name in enumerate(class_names):
        is_positive = y_true == k
        row = {"class": name, "n_positive": int(is_positive.sum()), "n_negative": int((~is_positive).sum())}
        if is_positive.all() or not is_positive.any():
            rows.append({**row, "note": "AUC undefined: class absent or the only class"})
            continue
        result = delong_test(is_positive.astype(int), probs_a[:, k], probs_b[:, k], alpha=alpha)
        low, high = result.pop("ci_diff")
        rows.append({**row, **result, "ci_low": low, "ci_high": high, "note": ""})
    table = pd.DataFrame(rows)
    for column in ("auc_a", "auc_b", "diff", "se_diff", "z", "p_value", "ci_low", "ci_high"):
        if column not in table.columns:
            table[column] = np.nan
    table["p_holm"] = holm_adjust(table["p_value"].to_numpy(dtype=float))
    return table[["class", "n_positive", "n_negative", "auc_a", "auc_b", "diff", "ci_low", "ci_high", "se_diff", "z",
                  "p_value", "p_holm", "note"]]


# ---------------------------------------------------------------------------------------------------------------
# Repeated k-fold cross-validation: the corrected resampled t-test.


def _examples(units, count: int = 5) -> str:
    units = sorted(units, key=str)
    shown = ", ".join(str(unit) for unit in units[:count])
    return f"[{shown}{', ...' if len(units) > count else ''}]"


def _aligned_fold_scores(scores_a, scores_b, drop_unmatched: bool) -> tuple[np.ndarray, np.ndarray, pd.Index | None,
                                                                              int]:
    """(a, b, index of the matched units or None, number of units dropped) for `corrected_resampled_ttest`."""
    if isinstance(scores_a, pd.Series) and isinstance(scores_b, pd.Series):
        for name, series in (("A", scores_a), ("B", scores_b)):
            duplicated = series.index[series.index.duplicated()]
            if len(duplicated):
                raise ValueError(f"the fold scores of {name} repeat the units {_examples(set(duplicated))}: give one "
                                 "score per (repeat, fold)")
        only_a, only_b = scores_a.index.difference(scores_b.index), scores_b.index.difference(scores_a.index)
        common = scores_a.index.intersection(scores_b.index).sort_values()
        if len(only_a) or len(only_b):
            counts = (f"{len(common)} units in both, {len(only_a)} only in A {_examples(only_a)}, "
                      f"{len(only_b)} only in B {_examples(only_b)}")
            if not drop_unmatched:
                raise ValueError(f"the two arms' fold scores do not cover the same (repeat, fold) units: {counts}; "
                                 "compare them on the same units, or pass drop_unmatched=True")
            warnings.warn(f"corrected t-test restricted to the common units: {counts}", stacklevel=3)
        a = scores_a.loc[common].to_numpy(dtype=float)
        b = scores_b.loc[common].to_numpy(dtype=float)
        return a, b, common, len(only_a) + len(only_b)
    if isinstance(scores_a, pd.Series) or isinstance(scores_b, pd.Series):
        raise ValueError("one arm's fold scores are a Series and the other's are not: pass two Series indexed by "
                         "(repeat, fold), or two aligned arrays")
    a, b = np.asarray(scores_a, dtype=float).ravel(), np.asarray(scores_b, dtype=float).ravel()
    if a.size != b.size:
        raise ValueError(f"{a.size} fold scores for A and {b.size} for B: unindexed scores must be aligned arrays "
                         "(pass pandas Series indexed by (repeat, fold) to match them by unit)")
    return a, b, None, 0


def _mean_size(value, name: str) -> float:
    sizes = np.asarray(value, dtype=float).ravel()
    if sizes.size == 0 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"{name} must be a positive number of units (or one per fold), got {value!r}")
    return float(sizes.mean())


def _n_repeats(index: pd.Index | None) -> int | None:
    if index is None:
        return None
    if "repeat" in (index.names or []):
        return int(index.get_level_values("repeat").nunique())
    return int(index.get_level_values(0).nunique()) if isinstance(index, pd.MultiIndex) else None


def _t_statistic(mean: float, variance: float, all_equal: bool) -> tuple[float, float]:
    """(t, unscaled se); all differences equal: t = 0 when they are 0, else +-inf (see the caller's docstring)."""
    if all_equal:
        return (0.0 if mean == 0 else float(np.copysign(np.inf, mean))), 0.0
    se = float(np.sqrt(variance))
    return mean / se, se


def corrected_resampled_ttest(scores_a, scores_b, n_train, n_test, alpha: float = 0.05,
                              drop_unmatched: bool = False) -> dict:
    """Corrected repeated k-fold cross-validation t-test of two arms' fold-level scores (A - B).

    Nadeau & Bengio (2003), "Inference for the generalization error", Machine Learning 52:239-281; the repeated
    k-fold form of Bouckaert & Frank (2004), "Evaluating the replicability of significance tests for comparing
    learning algorithms", PAKDD, LNCS 3056:3-12. Why the correction: the folds' training sets overlap (within a
    repeat and across repeats), so the n = r x k differences are positively correlated; the naive paired t-test
    divides their variance by n as if independent, which makes it too small and the type-I error far above alpha.

    With ``d_j = a_j - b_j``, j = 1..n: ``t = mean(d) / sqrt((1/n + n_test/n_train) * var(d, ddof=1))``, ``df =
    n - 1``, a two-sided p from Student's t and ``CI = mean(d) +- t_{1-alpha/2, df} * sqrt(corrected variance)``.

    ``scores_a, scores_b``: aligned 1-D arrays, or pandas Series indexed by the unit (e.g. a (repeat, fold)
    MultiIndex), matched on that index; units only one arm has are a ValueError naming them unless
    ``drop_unmatched``, which tests the common ones and warns. NaN scores are an error (drop them first).
    ``n_train, n_test``: training and test units (e.g. patients) per fold, scalars or one value per fold; per-fold
    values are averaged (the correction takes one ratio, the mean test size over the mean training size).
    All differences equal (zero variance): ``t = 0, p = 1`` when they are all 0, else ``t = +-inf, p = 0`` (an
    exact, if degenerate, answer); the CI is then the single point ``mean(d)``.

    Returns ``mean_difference, t, df, p, ci_low, ci_high, se`` (the corrected standard error), ``n_units``,
    ``n_repeats`` (distinct values of the index level ``repeat``, else of a MultiIndex's first level; None for
    arrays), ``n_dropped``, ``correction`` (n_test / n_train), ``naive_p`` (the uncorrected paired t-test's p, to
    show what the correction changes).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a, b, index, n_dropped = _aligned_fold_scores(scores_a, scores_b, drop_unmatched)
    differences = a - b
    undefined = ~np.isfinite(differences)
    if undefined.any():
        where = list(index[undefined]) if index is not None else np.flatnonzero(undefined).tolist()
        raise ValueError(f"fold scores are NaN or infinite for {int(undefined.sum())} units {_examples(where)}: "
                         "drop those units from both arms first")
    n = differences.size
    if n < 2:
        raise ValueError(f"the corrected t-test needs at least 2 (repeat, fold) units scored by both arms, got {n}")
    correction = _mean_size(n_test, "n_test") / _mean_size(n_train, "n_train")
    mean = float(differences.mean())
    variance = float(differences.var(ddof=1))
    all_equal = bool(np.all(differences == differences[0]))  # exact: a variance of 1e-34 is rounding, not spread
    df = n - 1
    t, se = _t_statistic(mean, (1 / n + correction) * variance, all_equal)
    naive_t, _ = _t_statistic(mean, variance / n, all_equal)
    half_width = float(student_t.ppf(1 - alpha / 2, df)) * se
    return {
        "mean_difference": mean,
        "t": float(t),
        "df": df,
        "p": float(2 * student_t.sf(abs(t), df)),
        "ci_low": mean - half_width,
        "ci_high": mean + half_width,
        "se": se,
        "n_units": n,
        "n_repeats": _n_repeats(index),
        "n_dropped": n_dropped,
        "correction": correction,
        "naive_p": float(2 * student_t.sf(abs(naive_t), df)),
    }
