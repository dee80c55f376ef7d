"""Repeated k-fold CV statistics: the corrected resampled t-test, the per-arm spread tables and the repeats plot."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t
from scipy.stats import ttest_rel

from tlese.evaluate.report import plot_repeats, write_report
from tlese.evaluate.stats import corrected_resampled_ttest
from tlese.evaluate.tables import fold_spread, repeat_summary

# 2 repeats x 3 folds of two arms, written out: the differences are 0.04 0.02 0.01 / 0.03 0.01 0.04.
FOLD_SCORES = pd.DataFrame({
    "repeat": [0, 0, 0, 1, 1, 1],
    "fold": [0, 1, 2, 0, 1, 2],
    "a": [0.80, 0.82, 0.78, 0.81, 0.79, 0.83],
    "b": [0.76, 0.80, 0.77, 0.78, 0.78, 0.79],
}).set_index(["repeat", "fold"])
# By hand: mean = 0.15 / 6 = 0.025; squared deviations (0.015, -0.005, -0.015, 0.005, -0.015, 0.015)^2 sum to
# 950e-6, so s2 = 950e-6 / 5 = 1.9e-4. With n_train = 200, n_test = 100: factor = 1/6 + 100/200 = 2/3,
# corrected variance = 1.9e-4 * 2/3 = 1.2667e-4, t = 0.025 / sqrt(1.2667e-4) = 2.221308, df = 5.
HAND_MEAN, HAND_S2, HAND_FACTOR, HAND_T = 0.025, 1.9e-4, 2 / 3, 2.221308


def test_corrected_ttest_equals_a_hand_computation():
    result = corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["b"], n_train=200, n_test=100)
    assert result["mean_difference"] == pytest.approx(HAND_MEAN)
    assert result["correction"] == pytest.approx(0.5)
    assert result["se"] == pytest.approx(math.sqrt(HAND_FACTOR * HAND_S2))
    assert result["t"] == pytest.approx(HAND_T, rel=1e-6)
    assert result["df"] == 5 and result["n_units"] == 6 and result["n_repeats"] == 2 and result["n_dropped"] == 0
    assert result["p"] == pytest.approx(2 * student_t.sf(HAND_T, 5), rel=1e-5)
    assert 0.05 < result["p"] < 0.1  # about 0.077: not significant, while the naive test says 0.007
    half_width = student_t.ppf(0.975, 5) * math.sqrt(HAND_FACTOR * HAND_S2)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((HAND_MEAN - half_width, HAND_MEAN + half_width))
    assert result["ci_low"] < 0 < result["ci_high"]
    # Plain aligned arrays give the same answer; no index, so no repeat count.
    from_arrays = corrected_resampled_ttest(FOLD_SCORES["a"].to_numpy(), FOLD_SCORES["b"].to_numpy(), 200, 100)
    assert from_arrays["t"] == pytest.approx(HAND_T, rel=1e-6) and from_arrays["n_repeats"] is None


def test_per_fold_sizes_are_averaged_and_alpha_sets_the_interval():
    sizes = corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["b"], n_train=[190, 200, 210, 195, 205, 200],
                                      n_test=np.array([105, 100, 95, 100, 100, 100]))
    assert sizes["correction"] == pytest.approx(0.5) and sizes["t"] == pytest.approx(HAND_T, rel=1e-6)
    wide = corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["b"], 200, 100, alpha=0.01)
    assert wide["ci_high"] - wide["ci_low"] > sizes["ci_high"] - sizes["ci_low"]
    with pytest.raises(ValueError, match="n_train must be a positive"):
        corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["b"], n_train=0, n_test=100)


def test_the_correction_is_more_conservative_than_the_naive_paired_ttest():
    result = corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["b"], n_train=200, n_test=100)
    naive = ttest_rel(FOLD_SCORES["a"], FOLD_SCORES["b"])
    assert result["naive_p"] == pytest.approx(naive.pvalue)
    assert result["naive_p"] < 0.01 < 0.05 < result["p"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(0.8, 0.03, size=50)  # 10 x 5-fold
        b = a - rng.normal(0.01, 0.02, size=50)
        test = corrected_resampled_ttest(a, b, n_train=400, n_test=100)
        assert test["p"] > test["naive_p"]
        assert abs(test["t"]) == pytest.approx(abs(ttest_rel(a, b).statistic) / math.sqrt(1 + 50 * 0.25))


def test_units_are_matched_on_the_repeat_fold_index_and_missing_ones_are_named():
    shuffled = FOLD_SCORES["b"].iloc[[3, 0, 5, 1, 4, 2]]
    assert corrected_resampled_ttest(FOLD_SCORES["a"], shuffled, 200, 100)["t"] == pytest.approx(HAND_T, rel=1e-6)
    # Positionally the shuffled order would be a different test: the index is what pairs the scores.
    positional = corrected_resampled_ttest(FOLD_SCORES["a"].to_numpy(), shuffled.to_numpy(), 200, 100)
    assert positional["t"] != pytest.approx(HAND_T, rel=1e-3)

    partial = FOLD_SCORES["b"].drop(index=(1, 2))
    with pytest.raises(ValueError, match=r"1 only in A \[\(1, 2\)\], 0 only in B"):
        corrected_resampled_ttest(FOLD_SCORES["a"], partial, 200, 100)
    with pytest.warns(UserWarning, match="restricted to the common units"):
        dropped = corrected_resampled_ttest(FOLD_SCORES["a"], partial, 200, 100, drop_unmatched=True)
    by_hand = FOLD_SCORES.drop(index=(1, 2))
    expected = corrected_resampled_ttest(by_hand["a"].to_numpy(), by_hand["b"].to_numpy(), 200, 100)
    assert dropped["n_units"] == 5 and dropped["n_dropped"] == 1 and dropped["df"] == 4
    assert dropped["t"] == pytest.approx(expected["t"]) and dropped["p"] == pytest.approx(expected["p"])

    with pytest.raises(ValueError, match=r"repeat the units \[\(0, 1\)\]"):
        corrected_resampled_ttest(FOLD_SCORES["a"], pd.concat([FOLD_SCORES["b"], FOLD_SCORES["b"].iloc[[1]]]),
                                  200, 100)
    with pytest.raises(ValueError, match="one arm's fold scores are a Series"):
        corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["b"].to_numpy(), 200, 100)
    with pytest.raises(ValueError, match="6 fold scores for A and 5 for B"):
        corrected_resampled_ttest(FOLD_SCORES["a"].to_numpy(), partial.to_numpy(), 200, 100)


def test_too_few_units_and_undefined_scores_are_errors():
    with pytest.raises(ValueError, match="at least 2"):
        corrected_resampled_ttest([0.8], [0.7], 200, 100)
    with_nan = FOLD_SCORES["a"].copy()
    with_nan.loc[(0, 1)] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite for 1 units \[\(0, 1\)\]"):
        corrected_resampled_ttest(with_nan, FOLD_SCORES["b"], 200, 100)


def test_zero_variance_of_the_differences():
    same = corrected_resampled_ttest(FOLD_SCORES["a"], FOLD_SCORES["a"], 200, 100)
    assert (same["t"], same["p"], same["naive_p"]) == (0.0, 1.0, 1.0)
    assert same["ci_low"] == same["ci_high"] == 0.0
    better = corrected_resampled_ttest([0.75, 0.5, 0.25], [0.5, 0.25, 0.0], 200, 100)  # exact binary fractions
    assert better["t"] == math.inf and better["p"] == 0.0 and better["naive_p"] == 0.0
    assert better["ci_low"] == better["ci_high"] == 0.25
    worse = corrected_resampled_ttest([0.5, 0.25, 0.0], [0.75, 0.5, 0.25], 200, 100)
    assert worse["t"] == -math.inf and worse["p"] == 0.0 and worse["mean_difference"] == -0.25


PER_REPEAT = pd.DataFrame({
    "arm": ["B", "A", "A", "A"],
    "repeat": [0, 0, 1, 2],
    "accuracy": [0.70, 0.80, 0.84, 0.82],
    "macro_auc": [0.90, 0.50, np.nan, 0.70],
    "complete": [True, True, True, False],
})


def test_repeat_summary_equals_a_hand_computation():
    summary = repeat_summary(PER_REPEAT, ["accuracy", "macro_auc"]).set_index("arm")
    assert list(summary.index) == ["B", "A"]  # order of appearance
    a = summary.loc["A"]
    # accuracy 0.80, 0.84, 0.82: mean 0.82, sd = sqrt((0.02^2 + 0.02^2 + 0) / 2) = 0.02.
    assert a["n_repeats"] == 3
    assert a["accuracy mean"] == pytest.approx(0.82) and a["accuracy sd"] == pytest.approx(0.02)
    assert (a["accuracy min"], a["accuracy max"]) == pytest.approx((0.80, 0.84))
    assert a["accuracy (mean ± sd)"] == "0.820 ± 0.020"
    # macro_auc 0.50, NaN, 0.70: the undefined repeat is skipped: mean 0.6, sd sqrt(0.02) = 0.1414.
    assert a["macro_auc mean"] == pytest.approx(0.6) and a["macro_auc sd"] == pytest.approx(math.sqrt(0.02))
    b = summary.loc["B"]
    assert b["n_repeats"] == 1 and b["accuracy mean"] == pytest.approx(0.70) and math.isnan(b["accuracy sd"])
    assert b["accuracy (mean ± sd)"] == "0.700"
    with pytest.raises(ValueError, match=r"more than one row for \(arm, repeat\) \[\('A', 1\)\]"):
        repeat_summary(pd.concat([PER_REPEAT, PER_REPEAT.iloc[[2]]]), ["accuracy"])
    with pytest.raises(ValueError, match=r"lacks the columns \['f1'\]"):
        repeat_summary(PER_REPEAT, ["f1"])


def test_fold_spread_equals_a_hand_computation():
    per_fold = pd.DataFrame({"arm": ["A"] * 4 + ["B"] * 2, "repeat": [0, 0, 1, 1, 0, 0], "fold": [0, 1, 0, 1, 0, 1],
                             "accuracy": [0.1, 0.3, 0.2, 0.6, 0.5, 0.5]})
    spread = fold_spread(per_fold, ["accuracy"]).set_index("arm")
    # A pooled: 0.1 0.3 0.2 0.6, mean 0.3, sum of squares 0.14, sd sqrt(0.14 / 3); within: sqrt(0.02), sqrt(0.08).
    assert spread.loc["A", "accuracy fold sd"] == pytest.approx(math.sqrt(0.14 / 3))
    assert spread.loc["A", "accuracy within-repeat fold sd"] == pytest.approx((math.sqrt(0.02) + math.sqrt(0.08)) / 2)
    assert (spread.loc["A", "n_repeats"], spread.loc["A", "n_folds"]) == (2, 4)
    assert spread.loc["B", "accuracy fold sd"] == 0.0 and spread.loc["B", "n_repeats"] == 1


def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_repeats_with_one_repeat_three_repeats_and_unequal_arms(tmp_path):
    one = pd.DataFrame({"arm": ["A", "B"], "repeat": [0, 0], "accuracy": [0.8, 0.7]})
    assert _is_png(plot_repeats(one, "accuracy", tmp_path / "one.png"))
    three = pd.DataFrame({"arm": ["A"] * 3 + ["B"] * 3, "repeat": [0, 1, 2] * 2,
                          "accuracy": [0.8, 0.82, 0.81, 0.7, 0.75, 0.72]})
    assert _is_png(plot_repeats(three, "accuracy", tmp_path / "three.png", title="accuracy", label_repeats=False))
    # Unequal arms, an undefined repeat, an incomplete repeat and an arm with no defined value at all.
    unequal = pd.concat([PER_REPEAT, pd.DataFrame({"arm": ["C"], "repeat": [0], "macro_auc": [np.nan]})])
    path = plot_repeats(unequal, "macro_auc", tmp_path / "nested" / "unequal.png")
    assert path == tmp_path / "nested" / "unequal.png" and _is_png(path)
    with pytest.raises(ValueError, match=r"lacks the columns \['f1'\]"):
        plot_repeats(one, "f1", tmp_path / "f1.png")


def test_write_report_shows_the_repeats_plot_and_extra_tables(tmp_path):
    classes = ["benign", "malignant"]
    rng = np.random.default_rng(0)
    target = np.tile([0, 1], 10)
    p1 = np.clip(0.3 + 0.4 * target + rng.normal(0, 0.15, 20), 0.01, 0.99)
    predictions = pd.DataFrame({"fold": np.repeat([0, 1], 10), "patient_id": [f"P{i}" for i in range(20)],
                                "target": target, "pred": (p1 > 0.5).astype(int),
                                "prob_benign": 1 - p1, "prob_malignant": p1})
    run = tmp_path / "run"
    plot = plot_repeats(PER_REPEAT, "accuracy", run / "plots" / "repeats_accuracy.png")
    summary = repeat_summary(PER_REPEAT, ["accuracy"])
    paths = write_report(run, title="repeats", summary_table=summary, per_fold_table=None, predictions=predictions,
                         class_names=classes, environment={"seed": 0}, extra_plots={"Repeats: accuracy": plot},
                         extra_tables={"Repeats: mean ± sd over repeats": summary})
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "## Repeats: mean ± sd over repeats" in md and "0.820 ± 0.020" in md
    assert "![Repeats: accuracy](plots/repeats_accuracy.png)" in md
    assert md.index("## Repeats: mean ± sd over repeats") < md.index("## ROC curves")  # tables before plots
    assert "<h2>Repeats: mean ± sd over repeats</h2>" in html and html.count("data:image/png;base64,") == 3
