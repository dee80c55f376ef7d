import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tlese.evaluate.metrics import binary_auc
from tlese.evaluate.stats import (
    BootstrapCI,
    bootstrap_ci,
    delong_per_class,
    delong_roc_variance,
    delong_test,
    holm_adjust,
    paired_bootstrap_test,
)


def _scores(n=300, separation=0.8, seed=0, rounding=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(separation * y + rng.normal(size=n), rounding)  # rounding creates ties


def _brute_force_delong(y, score_sets):
    """DeLong et al. (1988) by definition: O(m n) kernel psi(x, y) = 1[x > y] + 1/2 1[x = y]."""
    components = []
    for scores in score_sets:
        positives, negatives = scores[y == 1], scores[y == 0]
        psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
        components.append((psi.mean(1), psi.mean(0)))
    m, n = (y == 1).sum(), (y == 0).sum()
    v10 = np.array([c[0] for c in components])
    v01 = np.array([c[1] for c in components])
    return np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def test_delong_auc_equals_sklearn_and_variance_equals_definition():
    y, scores = _scores()
    auc, variance = delong_roc_variance(y, scores)
    assert auc == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert variance == pytest.approx(_brute_force_delong(y, [scores])[0, 0], rel=1e-10)


def test_delong_variance_matches_bootstrap_variance():
    y, scores = _scores(n=400, seed=1, rounding=3)
    _, variance = delong_roc_variance(y, scores)
    rng = np.random.default_rng(0)
    aucs = []
    for _ in range(1500):
        index = rng.integers(0, len(y), len(y))
        if 0 < y[index].sum() < len(y):
            aucs.append(binary_auc(y[index], scores[index]))  # equals roc_auc_score (test_evaluate_metrics), faster
    assert variance == pytest.approx(np.var(aucs), rel=0.2)


def test_delong_on_hanley_mcneil_1982_ct_ratings():
    # Hanley & McNeil (Radiology 1982, Table 1): 5-point CT ratings of 58 normal and 51 abnormal cases,
    # published area 0.893 and (approximate, exponential-model) standard error 0.0304. Heavy ties test midranks.
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(58), np.ones(51)]
    auc, variance = delong_roc_variance(y, np.r_[normal, abnormal])
    assert auc == pytest.approx(0.893, abs=5e-4)
    assert math.sqrt(variance) == pytest.approx(0.0304, abs=0.001)


def test_delong_test_covariance_matches_definition():
    y, scores_a = _scores(seed=2)
    scores_b = np.round(scores_a + np.random.default_rng(3).normal(size=len(y)), 1)
    result = delong_test(y, scores_a, scores_b)
    cov = _brute_force_delong(y, [scores_a, scores_b])
    assert result["se_diff"] == pytest.approx(math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-10)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, scores_a))
    assert result["diff"] == pytest.approx(result["auc_a"] - result["auc_b"])
    low, high = result["ci_diff"]
    assert low < result["diff"] < high


def test_delong_identical_models_not_significant_and_better_model_significant():
    y, scores = _scores(seed=4)
    same = delong_test(y, scores, scores.copy())
    assert same["diff"] == 0 and same["z"] == 0 and same["p_value"] == 1.0
    noise = np.random.default_rng(5).normal(size=len(y))
    better = delong_test(y, scores, scores + 3 * noise)  # b is a much noisier copy of a
    assert better["diff"] > 0.1 and better["p_value"] < 1e-4


def test_delong_p_values_are_roughly_uniform_under_the_null():
    # Two models of equal quality (independent noise on the same signal): about 5% of tests reject at 0.05.
    rng = np.random.default_rng(6)
    p_values = []
    for _ in range(300):
        y = rng.integers(0, 2, 120)
        p_values.append(delong_test(y, y + rng.normal(size=120), y + rng.normal(size=120))["p_value"])
    p_values = np.array(p_values)
    assert 0.01 <= (p_values < 0.05).mean() <= 0.11
    assert 0.4 <= np.mean(p_values) <= 0.6


def test_delong_rejects_single_class_labels():
    with pytest.raises(ValueError, match="both positive and negative"):
        delong_roc_variance([1, 1, 1], [0.1, 0.2, 0.3])


def test_holm_adjust():
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    adjusted = holm_adjust([0.02, float("nan"), 0.5])
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == 0.5


def test_delong_per_class_handles_an_absent_class():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)  # class 2 never occurs
    probs_a = rng.dirichlet([1, 1, 1], 200)
    probs_a[np.arange(200), y] += 1
    probs_b = rng.dirichlet([1, 1, 1], 200)
    table = delong_per_class(y, probs_a, probs_b, ["A", "B", "C"])
    assert list(table["class"]) == ["A", "B", "C"]
    assert math.isnan(table.loc[2, "p_value"]) and "absent" in table.loc[2, "note"]
    assert (table.loc[:1, "p_value"] < 1e-3).all()
    assert (table.loc[:1, "p_holm"] >= table.loc[:1, "p_value"]).all()


# --- bootstrap -------------------------------------------------------------------------------------------------


def _accuracy(frame: pd.DataFrame) -> float:
    return float((frame["target"] == frame["pred"]).mean())


def _clustered_table(n_patients=80, copies=8, seed=0):
    """Each patient's images are copies of one prediction: image-level resampling pretends to have 8x the data."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n_patients) < 0.7
    one_row = pd.DataFrame({"patient_id": np.arange(n_patients), "target": 1, "pred": correct.astype(int)})
    table = one_row.loc[one_row.index.repeat(copies)].reset_index(drop=True)
    table["image_id"] = np.arange(len(table))
    return one_row, table


def test_bootstrap_resamples_patients_not_images():
    one_row, table = _clustered_table()
    patient_ci = bootstrap_ci(table, _accuracy, group_column="patient_id", n_boot=500, seed=0)
    image_ci = bootstrap_ci(table, _accuracy, group_column="image_id", n_boot=500, seed=0)
    reference = bootstrap_ci(one_row, _accuracy, group_column="patient_id", n_boot=500, seed=0)
    width = {name: ci.high - ci.low for name, ci in (("patient", patient_ci), ("image", image_ci), ("one", reference))}
    assert patient_ci.point == image_ci.point == pytest.approx(one_row["pred"].mean())
    assert width["patient"] > 2 * width["image"]  # about sqrt(8) wider
    assert width["patient"] == pytest.approx(width["one"], rel=0.25)  # copies add no information


def test_bootstrap_ci_unpacks_is_reproducible_and_reports_skipped_resamples():
    _, table = _clustered_table(n_patients=10, copies=2)

    def metric_undefined_when_all_correct(frame):
        return float("nan") if frame["pred"].all() else _accuracy(frame)

    table.loc[table["patient_id"] != 0, "pred"] = 1  # only patient 0 is wrong: resamples without it are NaN
    table.loc[table["patient_id"] == 0, "pred"] = 0
    result = bootstrap_ci(table, metric_undefined_when_all_correct, n_boot=200, seed=1)
    point, low, high = result
    assert isinstance(result, BootstrapCI) and low <= point <= high
    assert 0 < result.n_used < 200  # P(patient 0 never drawn) = 0.9^10 ~ 35% of resamples skipped
    assert tuple(bootstrap_ci(table, metric_undefined_when_all_correct, n_boot=200, seed=1)) == (point, low, high)
    assert "(" in result.format()


def test_bootstrap_draws_whole_patients_and_treats_a_patient_drawn_twice_as_two():
    _, table = _clustered_table(n_patients=15, copies=3)
    counts = []

    def count_patients(frame):
        counts.append(frame["patient_id"].nunique())
        original_patient = frame["image_id"] // 3  # image ids 3p..3p+2 belong to patient p
        clusters = original_patient.groupby(frame["patient_id"])
        assert (clusters.nunique() == 1).all() and (clusters.size() == 3).all()
        assert (frame.groupby("patient_id")["image_id"].nunique() == 3).all()  # all three images, once each
        return 0.0

    bootstrap_ci(table, count_patients, n_boot=20)
    assert counts[1:] == [15] * 20  # first call is the point estimate on the original table


def test_paired_bootstrap_identical_models_and_clearly_better_model(predictions_factory):
    good = predictions_factory(n_patients=80, signal=2.5, seed=0)
    prob_columns = [column for column in good.columns if column.startswith("prob_")]
    poor = good.copy()  # the same cases scored by a model with hardly any signal
    poor[prob_columns] = predictions_factory(n_patients=80, signal=2.5, seed=0)[prob_columns].sample(
        frac=1, random_state=1).to_numpy()
    poor["pred"] = poor[prob_columns].to_numpy().argmax(1)

    same = paired_bootstrap_test(good, good.copy(), _accuracy, n_boot=300)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0

    better = paired_bootstrap_test(good, poor.sample(frac=1, random_state=0), _accuracy, n_boot=300)
    assert better["diff"] > 0.3 and better["ci_low"] > 0 and better["p_value"] < 0.01
    assert better["metric_a"] == pytest.approx(_accuracy(good)) and better["metric_b"] == pytest.approx(_accuracy(poor))
    # Row order does not matter: the sets are aligned on their unit key (patient_id, side, view).
    assert paired_bootstrap_test(good, poor, _accuracy, n_boot=300)["ci_low"] == better["ci_low"]


def test_paired_bootstrap_refuses_mismatched_cases(predictions_factory):
    a = predictions_factory(n_patients=20)
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap_test(a, a.iloc[:-1], _accuracy, n_boot=10)
    b = a.copy()
    b.loc[0, "target"] = (b.loc[0, "target"] + 1) % 4
    with pytest.raises(ValueError, match="disagree on the target"):
        paired_bootstrap_test(a, b, _accuracy, n_boot=10)
