"""Temperature scaling of predicted probabilities, and the numbers that say whether it helped (ECE, NLL).

The run's prediction files hold probabilities, not logits; their logarithms serve as logits (softmax(log p) = p), so
a temperature T rescales them as softmax(log p / T). T > 1 softens over-confident predictions, T < 1 sharpens. T is
fitted by minimising the negative log-likelihood of the true classes over log T (bounded), on out-of-fold
predictions only: each patient predicted by the fold model that never trained on them.

`fit_ensemble_calibration` decides whether a bundle applies T at all: cross-fitted over the folds, it scores every
patient with a temperature fitted without their fold, and applies T only when that held-out check shows it helps;
`calibrated_ensemble` turns the fold models' probabilities into the ensemble's as the bundle's record says.
See docs/ood_and_calibration.md.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12
# log T is searched in [log T_MIN, log T_MAX]: wide enough for any sane model, bounded so a degenerate set
# (e.g. every prediction uniform) cannot run off to infinity.
T_MIN, T_MAX = 0.05, 20.0


def _check(probs: np.ndarray, targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, K) with K >= 2, got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if targets is None:
        return probs, None
    targets = np.asarray(targets)
    if targets.shape != (len(probs),):
        raise ValueError(f"targets must be ({len(probs)},), got shape {targets.shape}")
    if len(targets) and (targets.min() < 0 or targets.max() >= probs.shape[1]):
        raise ValueError(f"targets must be class indices in 0..{probs.shape[1] - 1}")
    return probs, targets.astype(int)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row; T = 1 gives back p (renormalised)."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    probs, _ = _check(probs)
    logits = np.log(np.clip(probs, EPS, None)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean -log p(true class)."""
    probs, targets = _check(probs, targets)
    if not len(targets):
        raise ValueError("no predictions")
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], EPS, None)).mean())


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the NLL of `targets` under softmax(log p / T), searched on log T in
    [log 0.05, log 20] (scipy's bounded scalar minimiser)."""
    from scipy.optimize import minimize_scalar

    probs, targets = _check(probs, targets)
    if not len(targets):
        raise ValueError("cannot fit a temperature on no predictions")
    log_probs = np.log(np.clip(probs, EPS, None))
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        logits = log_probs / math.exp(log_t)
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        return float((log_norm - logits[rows, targets]).mean())

    result = minimize_scalar(nll, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: predictions binned by confidence (max probability) into `bins` equal-width bins over [0, 1]
    (each bin (low, high], the first also holding 0); the mean over bins of |accuracy - mean confidence| weighted by
    the bin's share of predictions."""
    probs, targets = _check(probs, targets)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not len(targets):
        raise ValueError("no predictions")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for index in range(bins):
        members = which == index
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def calibration_summary(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> dict:
    """Fit T on (`probs`, `targets`) and report it with ECE and NLL before and after, as plain numbers."""
    temperature = fit_temperature(probs, targets)
    scaled = apply_temperature(probs, temperature)
    return {"method": "temperature scaling", "temperature": temperature, "n": int(len(targets)), "ece_bins": bins,
            "ece_before": expected_calibration_error(probs, targets, bins),
            "ece_after": expected_calibration_error(scaled, targets, bins),
            "nll_before": negative_log_likelihood(probs, targets),
            "nll_after": negative_log_likelihood(scaled, targets)}


# ---------------------------------------------------------------------------------------------------------------
# Calibration of the ensemble, checked on patients that neither the temperature nor the model saw

ENSEMBLE_METHOD = "temperature"
APPLIED_TO_MEMBERS = "each fold model's probabilities, before the ensemble mean"
# One-sided level of the bootstrap checks: the held-out NLL gain must be positive in at least this share of
# resamples, and the held-out ECE must not be worse in more than this share.
CHECK_LEVEL = 0.95


def fit_ensemble_calibration(oof_probs: np.ndarray, targets: np.ndarray, folds: np.ndarray,
                             groups: np.ndarray | None = None, *, bins: int = 15, n_boot: int = 500,
                             seed: int = 0) -> dict:
    """A temperature for the fold models of a run, applied only when patients that neither it nor the model saw
    confirm that it helps.

    `oof_probs` (N, K): each unit (breast or image) predicted by the one fold model that never trained on it;
    `targets` (N,) class indices; `folds` (N,) the test fold of each unit; `groups` (N,) the patient of each unit
    (the bootstrap resamples patients; default: every unit its own patient).

    Cross-fitting over folds: the units of fold j are scaled with a temperature fitted on the other folds' units, so
    every held-out number is computed on patients that neither the temperature nor the model ever saw. It is applied
    when the held-out NLL improves in >= 95% of patient-bootstrap resamples and the held-out ECE is not worse in
    >= 95% of them (noise allowed); the temperature reported is then the one fitted on all units.

    No patient of a run is unseen by more than one fold model, so the ensemble mean cannot be checked on the run's
    own data; what is checked is temperature scaling of a single fold model on new patients. The temperature is
    therefore meant for each fold model before the mean (`calibrated_ensemble`), not for the mean, which is already
    softer than its members: a T fitted on single models over-softens it.

    Returns {"method", "temperature", "applied", "applied_to", "fitted_on", "checked_on", "n", "n_patients",
    "n_folds", "fold_temperatures", "nll_before", "nll_after", "ece_before", "ece_after" (held-out, pooled),
    "nll_gain_ci", "ece_change_ci" (bootstrap 90% intervals), "ece_bins", "n_boot", "reason", "claim"}.
    """
    probs, targets = _check(oof_probs, targets)
    folds = np.asarray(folds)
    if folds.shape != targets.shape:
        raise ValueError(f"folds must be ({len(targets)},), got shape {folds.shape}")
    groups = np.arange(len(targets)) if groups is None else np.asarray(groups)
    if groups.shape != targets.shape:
        raise ValueError(f"groups must be ({len(targets)},), got shape {groups.shape}")
    if not len(targets):
        raise ValueError("cannot calibrate on no predictions")
    fold_ids = sorted({int(f) for f in folds})
    unit = f"{len(targets)} out-of-fold predictions of folds {fold_ids}"
    report = {"method": ENSEMBLE_METHOD, "temperature": 1.0, "applied": False, "applied_to": APPLIED_TO_MEMBERS,
              "fitted_on": unit, "checked_on": None, "n": int(len(targets)),
              "n_patients": int(len(np.unique(groups))), "n_folds": len(fold_ids), "fold_temperatures": {},
              "nll_before": None, "nll_after": None, "ece_before": None, "ece_after": None,
              "nll_gain_ci": None, "ece_change_ci": None, "ece_bins": bins, "n_boot": n_boot}
    fitted = fit_temperature(probs, targets)
    if len(fold_ids) < 2:
        return {**report, "temperature": fitted, "reason": "one fold only: no patients left to check a temperature "
                "on, so it is not applied", "claim": _claim(False)}

    held_out = np.empty_like(probs)
    for fold in fold_ids:
        here = folds == fold
        temperature = fit_temperature(probs[~here], targets[~here])
        report["fold_temperatures"][str(fold)] = temperature
        held_out[here] = apply_temperature(probs[here], temperature)
    report["checked_on"] = (f"cross-fitted over {len(fold_ids)} folds: each fold's units scaled with a temperature "
                            "fitted on the other folds' units (patients neither it nor the fold model saw)")
    report.update(nll_before=negative_log_likelihood(probs, targets),
                  nll_after=negative_log_likelihood(held_out, targets),
                  ece_before=expected_calibration_error(probs, targets, bins),
                  ece_after=expected_calibration_error(held_out, targets, bins))

    gains, ece_changes = _bootstrap_changes(probs, held_out, targets, groups, bins, n_boot, seed)
    tail = (1.0 - CHECK_LEVEL) * 100
    report["nll_gain_ci"] = [float(np.percentile(gains, tail)), float(np.percentile(gains, 100 - tail))]
    report["ece_change_ci"] = [float(np.percentile(ece_changes, tail)), float(np.percentile(ece_changes, 100 - tail))]
    helps = report["nll_after"] < report["nll_before"] and report["nll_gain_ci"][0] > 0
    worse_ece = report["ece_change_ci"][0] > 0
    if not helps:
        reason = (f"held-out NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f}: no improvement beyond "
                  f"noise (90% interval of the gain {report['nll_gain_ci'][0]:+.4f} .. "
                  f"{report['nll_gain_ci'][1]:+.4f}), so T = 1 is used")
    elif worse_ece:
        reason = (f"held-out ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}: worse beyond noise, so "
                  "T = 1 is used")
    else:
        reason = (f"held-out NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f} and ECE "
                  f"{report['ece_before']:.4f} -> {report['ece_after']:.4f} on patients neither the temperature "
                  "nor the fold model saw")
    if not T_MIN * 1.01 < fitted < T_MAX / 1.01:
        why = ("the fold models' probabilities carry almost no information: scaled, they are near-uniform"
               if fitted > 1 else "the fold models are right far more often than their probabilities say")
        reason += f"; T = {fitted:.3g} is at the edge of its search range [{T_MIN}, {T_MAX}]: {why}"
    applied = bool(helps and not worse_ece)
    return {**report, "temperature": fitted, "applied": applied, "reason": reason, "claim": _claim(applied)}


def _claim(applied: bool) -> str:
    if applied:
        return ("Temperature scaling improved a single fold model's calibration on patients that neither the "
                "temperature nor the model had seen (cross-fitted over folds). It is applied to each fold model "
                "before the ensemble mean; the calibration of the mean itself was not checked on unseen patients "
                "(none exist in the run), and a mean of calibrated models is, if anything, under-confident.")
    return ("No temperature is applied (T = 1): the ensemble's probabilities are the mean of the fold models' "
            "probabilities, uncalibrated; see 'reason'.")


def _bootstrap_changes(before: np.ndarray, after: np.ndarray, targets: np.ndarray, groups: np.ndarray, bins: int,
                       n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient-bootstrap distributions of the NLL gain (before - after) and of the ECE change (after - before)."""
    rows = np.arange(len(targets))
    loss_before = -np.log(np.clip(before[rows, targets], EPS, None))
    loss_after = -np.log(np.clip(after[rows, targets], EPS, None))
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    gains, ece_changes = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        picked = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        gains[b] = loss_before[picked].mean() - loss_after[picked].mean()
        ece_changes[b] = (expected_calibration_error(after[picked], targets[picked], bins)
                          - expected_calibration_error(before[picked], targets[picked], bins))
    return gains, ece_changes


def calibrated_ensemble(per_model: np.ndarray, calibration: dict | None) -> np.ndarray:
    """(M, B, K) fold-model probabilities -> (B, K) ensemble probabilities as a bundle's `calibration` says.

    `applied` false: the plain mean (T = 1). `applied_to` = APPLIED_TO_MEMBERS: each fold model scaled by T, then
    the mean. Bundles written before the check (no "applied" key, T applied to the mean): T on the mean, as they
    were made.
    """
    per_model = np.asarray(per_model, dtype=np.float64)
    if per_model.ndim != 3:
        raise ValueError(f"per-model probabilities must be (M, B, K), got shape {per_model.shape}")
    calibration = calibration or {}
    mean = per_model.mean(axis=0)
    legacy = "applied" not in calibration and "temperature" in calibration  # made before the check: always applied
    if not (calibration.get("applied") or legacy) or not per_model.shape[1]:
        return mean
    temperature = float(calibration["temperature"])
    if calibration.get("applied_to") == APPLIED_TO_MEMBERS:
        return np.mean([apply_temperature(probs, temperature) for probs in per_model], axis=0)
    return apply_temperature(mean, temperature)
