"""Temperature scaling: fitting, applying, ECE and NLL; and the ensemble's calibration, applied only when patients
that neither the temperature nor the fold model saw show that it helps."""

from __future__ import annotations

import numpy as np
import pytest

from tlese.bundle.calibration import (
    APPLIED_TO_MEMBERS,
    apply_temperature,
    calibrated_ensemble,
    expected_calibration_error,
    fit_ensemble_calibration,
    fit_temperature,
    negative_log_likelihood,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _synthetic(n: int = 4000, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from them: softmax(z) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, k))
    p = _softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, y


def test_overconfident_probabilities_get_a_temperature_above_one_and_a_lower_ece():
    z, y = _synthetic()
    overconfident = _softmax(3.0 * z)  # logits scaled by 3: the right temperature is 3
    temperature = fit_temperature(overconfident, y)
    assert temperature > 1 and abs(temperature - 3.0) < 0.3
    scaled = apply_temperature(overconfident, temperature)
    before, after = expected_calibration_error(overconfident, y), expected_calibration_error(scaled, y)
    assert after < before / 3
    assert negative_log_likelihood(scaled, y) < negative_log_likelihood(overconfident, y)


def test_calibrated_probabilities_keep_a_temperature_near_one_and_underconfident_ones_get_below_one():
    z, y = _synthetic(seed=1)
    assert abs(fit_temperature(_softmax(z), y) - 1.0) < 0.1
    assert fit_temperature(_softmax(0.5 * z), y) < 0.7


def test_apply_temperature():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert np.allclose(apply_temperature(p, 1.0), p)
    softened = apply_temperature(p, 2.0)
    assert np.allclose(softened.sum(axis=1), 1.0)
    assert (softened.max(axis=1) < p.max(axis=1)).all()
    assert (softened.argmax(axis=1) == p.argmax(axis=1)).all()
    assert np.allclose(softened[0], np.sqrt(p[0]) / np.sqrt(p[0]).sum())  # softmax(log p / 2) = sqrt(p), renormalised
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(p, bad)


def test_expected_calibration_error_known_answer():
    # Confidence 0.9 and right, 0.65 and wrong: two bins, each half the data: 0.5 * 0.1 + 0.5 * 0.65.
    probs = np.array([[0.9, 0.1], [0.65, 0.35]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.375)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)
    # Both in one bin (15 bins over [0, 1]: (0.6, 0.667]): |accuracy 0.5 - mean confidence 0.63|.
    same_bin = np.array([[0.62, 0.38], [0.64, 0.36]])
    assert expected_calibration_error(same_bin, np.array([0, 1])) == pytest.approx(0.13)
    with pytest.raises(ValueError, match="targets"):
        expected_calibration_error(probs, np.array([0, 2]))


# ---------------------------------------------------------------------------------------------------------------
# The ensemble's calibration, cross-fitted over folds


def _labels(p: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(len(p))[:, None] > p.cumsum(axis=1)).sum(axis=1)


def _run(n: int = 600, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True logits z, labels drawn from softmax(z), a test fold and a patient (two breasts each) per unit."""
    z = np.random.default_rng(seed).normal(0.0, 1.5, size=(n, 3))
    return z, _labels(_softmax(z), seed + 100), np.arange(n) % folds, np.arange(n) // 2


def test_overconfident_fold_models_get_a_temperature_that_helps_held_out_patients():
    z, y, folds, patients = _run()
    report = fit_ensemble_calibration(_softmax(3.0 * z), y, folds, patients)
    assert report["applied"] is True and report["applied_to"] == APPLIED_TO_MEMBERS
    assert abs(report["temperature"] - 3.0) < 0.5
    assert set(report["fold_temperatures"]) == {"0", "1", "2", "3", "4"}
    assert all(abs(t - 3.0) < 0.7 for t in report["fold_temperatures"].values())
    assert report["nll_after"] < report["nll_before"] and report["nll_gain_ci"][0] > 0
    assert report["ece_after"] < report["ece_before"] / 2
    assert report["n"] == 600 and report["n_patients"] == 300 and report["n_folds"] == 5
    assert "cross-fitted" in report["checked_on"] and "600 out-of-fold" in report["fitted_on"]
    assert "held-out NLL" in report["reason"] and "not checked" in report["claim"]


def test_underconfident_fold_models_get_a_sharpening_temperature():
    z, y, folds, patients = _run(seed=1)
    report = fit_ensemble_calibration(_softmax(0.5 * z), y, folds, patients)
    assert report["applied"] is True and report["temperature"] < 0.7


@pytest.mark.parametrize("n", [600, 40])
def test_well_calibrated_fold_models_keep_t_1(n):
    z, y, folds, patients = _run(n=n, seed=2)
    report = fit_ensemble_calibration(_softmax(z), y, folds, patients)
    assert report["applied"] is False
    assert "no improvement beyond noise" in report["reason"] and "T = 1" in report["claim"]
    # the held-out numbers are real: recompute them from the per-fold temperatures
    held_out = np.empty_like(_softmax(z))
    for fold, temperature in report["fold_temperatures"].items():
        here = folds == int(fold)
        held_out[here] = apply_temperature(_softmax(z)[here], temperature)
    assert report["nll_after"] == pytest.approx(negative_log_likelihood(held_out, y))
    assert report["ece_after"] == pytest.approx(expected_calibration_error(held_out, y))


def test_one_fold_cannot_be_checked_so_nothing_is_applied():
    z, y, _, _ = _run(n=100)
    report = fit_ensemble_calibration(_softmax(3.0 * z), y, np.zeros(100, dtype=int))
    assert report["applied"] is False and "one fold" in report["reason"] and report["nll_after"] is None


def test_patients_not_breasts_are_resampled():
    """Two identical breasts per patient carry no more evidence than one: the bootstrap must not count them twice."""
    z, y, folds, _ = _run(n=100, seed=3)
    twice = lambda a: np.concatenate([a, a])  # noqa: E731
    per_patient = fit_ensemble_calibration(twice(_softmax(1.3 * z)), twice(y), twice(folds), twice(np.arange(100)))
    per_breast = fit_ensemble_calibration(twice(_softmax(1.3 * z)), twice(y), twice(folds))
    width = lambda r: r["nll_gain_ci"][1] - r["nll_gain_ci"][0]  # noqa: E731
    assert width(per_patient) > 1.2 * width(per_breast)
    with pytest.raises(ValueError, match="folds"):
        fit_ensemble_calibration(_softmax(z), y, folds[:5])
    with pytest.raises(ValueError, match="groups"):
        fit_ensemble_calibration(_softmax(z), y, folds, np.arange(5))


def test_the_ensemble_uses_t_as_the_record_says():
    rng = np.random.default_rng(0)
    per_model = np.stack([_softmax(rng.normal(size=(4, 3)) * 2) for _ in range(3)])
    mean = per_model.mean(axis=0)
    assert np.allclose(calibrated_ensemble(per_model, {"temperature": 2.0, "applied": False}), mean)
    assert np.allclose(calibrated_ensemble(per_model, None), mean)
    members = calibrated_ensemble(per_model, {"temperature": 2.0, "applied": True, "applied_to": APPLIED_TO_MEMBERS})
    assert np.allclose(members, np.mean([apply_temperature(p, 2.0) for p in per_model], axis=0))
    legacy = calibrated_ensemble(per_model, {"method": "temperature", "temperature": 2.0,
                                             "applied_to": "ensemble-mean probability"})  # a format-1 bundle
    assert np.allclose(legacy, apply_temperature(mean, 2.0))
    assert calibrated_ensemble(per_model[:, :0], {"temperature": 2.0, "applied": True}).shape == (0, 3)


def test_t_of_single_models_over_softens_their_mean_less_when_applied_to_each_member():
    """Why T goes on each fold model: diverse over-confident members; T fitted on one member's held-out
    predictions is right for a member, too strong for their (already softer) mean."""
    z, y, _, _ = _run(n=20000, seed=4)
    rng = np.random.default_rng(5)
    per_model = np.stack([_softmax(2.0 * (z + rng.normal(0.0, 1.5, size=z.shape))) for _ in range(5)])
    fit, new = slice(0, 10000), slice(10000, None)
    temperature = fit_temperature(per_model[0, fit], y[fit])
    record = {"temperature": temperature, "applied": True}
    on_mean = negative_log_likelihood(calibrated_ensemble(per_model[:, new], record), y[new])
    on_members = negative_log_likelihood(
        calibrated_ensemble(per_model[:, new], {**record, "applied_to": APPLIED_TO_MEMBERS}), y[new])
    assert temperature > 3 and on_members < on_mean - 0.03


def test_fold_models_that_know_nothing_are_softened_to_near_uniform_and_the_reason_says_so():
    rng = np.random.default_rng(6)
    confident_noise = _softmax(rng.normal(0.0, 0.5, size=(300, 3)))  # labels independent of the probabilities
    report = fit_ensemble_calibration(confident_noise, rng.integers(0, 3, 300), np.arange(300) % 3)
    assert report["applied"] is True and report["temperature"] > 19
    assert "edge of its search range" in report["reason"] and "no information" in report["reason"]
