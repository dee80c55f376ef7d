"""Temperature scaling of predicted probabilities, and the numbers that say whether it helped (ECE, NLL).

The run's prediction files hold probabilities, not logits; their logarithms serve as logits (softmax(log p) = p), so
a temperature T rescales them as softmax(log p / T). T > 1 softens over-confident predictions, T < 1 sharpens. T is
fitted by minimising the negative log-likelihood of the true classes over log T (bounded), on out-of-fold
predictions only: each patient predicted by the fold model that never trained on them.
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
