"""Out-of-distribution score: how unlike the training images an input looks to the bundle's own fold models.

Features: each fold model's pooled penultimate features (`feature_extractor`), per view, concatenated over the fold
models (`penultimate_features`, (B, V * M * F): view blocks in the bundle's view order). Models trained from random
weights have unrelated feature coordinates, so a mean over models would mix unrelated units; concatenation keeps each
model's view and the PCA below compresses the redundancy.

Score (`OodModel.score`), per view image: standardise the features (training mean and spread), project them on the
leading principal components, and take the squared Mahalanobis distance there under a Ledoit-Wolf shrinkage
covariance, plus the squared distance off those components (the residual) divided by its training mean; a breast's
score is the largest of its views' scores (a chest X-ray tagged as MLO beside a real CC is still flagged). With too
few training images for a covariance the method falls back to the mean squared standardised feature ("diagonal"),
and the meta says so.

Float noise: the fold models compute in float32, so the same image gives features that differ by up to
`FLOAT_NOISE` of their RMS size between batch sizes, CPU kernels or ONNX Runtime. Every spread the score divides by
is floored so that such noise cannot move it: a feature's spread at `NOISE_FLOOR` x the features' RMS size; the
covariance of the principal components gets `NOISE_MARGIN` x the covariance the noise has there, and the
residual's training mean is at least `NOISE_MARGIN` x the noise's. Features that do not vary beyond the noise floor
at all (a collapsed model: the same features for every input) carry no information about the input: `fit_ood`
raises `DegenerateFeaturesError` and the bundle ships no OOD model.

Threshold (`fit_ood`): the `quantile` of cross-fitted training scores (each training breast scored by a model fitted
without it and without the rest of its patient's breasts (`groups`), so the scores are those of unseen
in-distribution images, not the smaller in-sample ones), and never below the same quantile of the final model's
in-sample scores; the false-flag rate is measured the same way one level down (each split's breasts against a
threshold chosen on the other splits' cross-fitted scores). The fold models themselves have seen the training
images, so on new patients of the same kind the false-flag rate can be somewhat higher: docs/ood_and_calibration.md
reports a held-out check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

METHOD = "mahalanobis"
DIAGONAL = "diagonal"
DEFAULT_QUANTILE = 0.98
MAX_COMPONENTS = 64
ROWS_PER_COMPONENT = 10
"""At least this many training rows per principal component: with fewer, the covariance over-fits its own rows
(192 mini-MIAS images on 64 components scored their own images twice as far as unseen women's, and the threshold
rose above chest X-rays' scores)."""
# Fewer training view images than this: no covariance (the diagonal fallback).
MIN_ROWS_FOR_COVARIANCE = 12
MAX_SPLITS = 5
# The largest float32 difference of one feature, relative to the features' RMS size, between batch sizes and between
# torch and ONNX Runtime (measured on a mini-MIAS model: 2.3e-6).
FLOAT_NOISE = 2.5e-6
# A feature whose spread over the training images is below this fraction of the features' RMS size is constant up to
# float noise: it is standardised by the floor, not its spread. Measured spreads: a collapsed 1-epoch model's
# features at most 4e-7 of their size, a 3-epoch mini-MIAS model's median 7.5e-5, up to 4e-4.
NOISE_FLOOR = 8 * FLOAT_NOISE
# No variance along a standardised direction is trusted below this multiple of what float noise gives there.
NOISE_MARGIN = 100.0
# Fewer features than this varying beyond the noise floor: degenerate, no OOD model.
MIN_VARYING_FEATURES = 2
TENSOR_NAMES = ("mean", "scale", "components", "precision")


def feature_extractor(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pooled penultimate features of one classifier, per view: `(B, V, F)` (V = 2 for a dual-view model,
    whose input is (B, 2, C, H, W); V = 1 for a single-view model, input (B, C, H, W))."""
    if getattr(model, "num_views", 1) > 1:
        return model.forward_views
    return lambda x: model.forward_features(x)[:, None]


@torch.no_grad()
def penultimate_features(models: Sequence[torch.nn.Module], x, batch_size: int = 16) -> np.ndarray:
    """(B, V * M * F) float64: every fold model's per-view features of `x` (array or tensor in [0, 1]), concatenated
    over the models within each view, the views one after the other. Models run in eval mode."""
    if not models:
        raise ValueError("no models to take features from")
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    extractors = [feature_extractor(model.eval()) for model in models]
    device = next(models[0].parameters()).device
    chunks = []
    for start in range(0, max(len(x), 1), batch_size):  # an empty x still gives (0, width)
        batch = x[start:start + batch_size].to(device=device, dtype=torch.float32)
        per_model = [extract(batch).float().cpu() for extract in extractors]  # each (b, V, F)
        chunks.append(torch.cat(per_model, dim=2).flatten(1).double().numpy())
    return np.concatenate(chunks)


class DegenerateFeaturesError(ValueError):
    """The training features do not vary beyond float noise: no OOD model can be fitted on them (`reason` says why)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def noise_floor(features) -> float:
    """The spread below which a feature counts as constant: `NOISE_FLOOR` x the RMS size of the features."""
    features = np.asarray(features, dtype=np.float64)
    return NOISE_FLOOR * float(np.sqrt(np.mean(features ** 2))) if features.size else 0.0


def degenerate_reason(features, views: int = 1) -> str | None:
    """Why `penultimate_features` of training inputs ((N, V * D)) cannot carry an OOD model, or None when they can:
    fewer than `MIN_VARYING_FEATURES` features vary beyond the noise floor (`noise_floor`) over the view images."""
    features = np.asarray(features, dtype=np.float64)
    rows = features.reshape(len(features) * views, -1)
    floor = noise_floor(rows)
    spread = rows.std(axis=0)
    varying = int((spread > floor).sum())
    if floor > 0 and varying >= MIN_VARYING_FEATURES:
        return None
    return (f"features degenerate: {varying} of {rows.shape[1]} features vary beyond float noise over the "
            f"{len(rows)} training view images (largest spread {float(spread.max()):.3g} against a floor of "
            f"{floor:.3g} = {NOISE_FLOOR:g} x their RMS size); the models give the same features for every image")


@dataclass(frozen=True)
class OodModel:
    """A fitted out-of-distribution scorer (see the module docstring); `score` and `flag` take
    `penultimate_features` of the same bundle."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    components: np.ndarray  # (C, D), orthonormal rows; C = 0 for the diagonal fallback
    precision: np.ndarray  # (C, C)
    residual_scale: float  # divides the squared residual
    views: int
    threshold: float
    info: dict  # everything else `meta` records

    @property
    def method(self) -> str:
        return DIAGONAL if not len(self.components) else METHOD

    def _check(self, features) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        width = self.views * len(self.mean)
        if features.ndim != 2 or features.shape[1] != width:
            raise ValueError(f"OOD features must be (B, {width}) (views x feature size of the bundle's models), got "
                             f"shape {features.shape}")
        return features

    def view_scores(self, features) -> np.ndarray:
        """(B, V): the score of each view image."""
        features = self._check(features)
        rows = features.reshape(len(features) * self.views, -1)
        return _row_scores(rows, self.mean, self.scale, self.components, self.precision,
                           self.residual_scale).reshape(len(features), self.views)

    def score(self, features) -> np.ndarray:
        """(B,) float64: the largest of each input's view scores; higher = less like the training images."""
        return self.view_scores(features).max(axis=1) if len(features) else np.zeros(0)

    def flag(self, features) -> np.ndarray:
        """(B,) bool: score above the threshold chosen on the training images."""
        return self.score(features) > self.threshold

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """float64 tensors for safetensors (`from_tensors` reads them back with `meta`)."""
        return {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.float64))
                for name in TENSOR_NAMES}

    def meta(self) -> dict:
        """Plain JSON numbers and words: method, threshold, false-flag rate, sizes, how it was fitted."""
        return {"method": self.method, "threshold": float(self.threshold), "views": self.views,
                "feature_dim": int(len(self.mean)), "n_components": int(len(self.components)),
                "residual_scale": float(self.residual_scale), **self.info}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> OodModel:
        """Rebuild from `to_tensors` and `meta` (extra meta keys, e.g. a file name, are kept in `info`); a missing
        tensor or key, or shapes that do not fit together, raise ValueError."""
        missing = [name for name in TENSOR_NAMES if name not in tensors]
        missing += [key for key in ("threshold", "views", "residual_scale") if key not in meta]
        if missing:
            raise ValueError(f"OOD model incomplete: missing {missing}")
        arrays = {name: np.asarray(torch.as_tensor(tensors[name]).detach().cpu().numpy(), dtype=np.float64)
                  for name in TENSOR_NAMES}
        width = arrays["mean"].size
        count = arrays["components"].size // width if width else 0
        shapes_fit = (arrays["mean"].ndim == 1 and width > 0 and arrays["scale"].shape == (width,)
                      and arrays["components"].size == count * width and arrays["precision"].size == count * count)
        if not shapes_fit:
            raise ValueError("OOD model tensors do not fit together: "
                             + ", ".join(f"{name} {tuple(array.shape)}" for name, array in arrays.items()))
        threshold, views, residual_scale = float(meta["threshold"]), int(meta["views"]), float(meta["residual_scale"])
        if not (np.isfinite(threshold) and views >= 1 and residual_scale > 0):
            raise ValueError(f"OOD model meta out of range: threshold {threshold}, views {views}, "
                             f"residual_scale {residual_scale}")
        info = {key: value for key, value in meta.items()
                if key not in ("method", "threshold", "views", "feature_dim", "n_components", "residual_scale")}
        return cls(mean=arrays["mean"], scale=arrays["scale"], components=arrays["components"].reshape(count, width),
                   precision=arrays["precision"].reshape(count, count), residual_scale=residual_scale, views=views,
                   threshold=threshold, info=info)


def fit_ood(features, *, views: int = 1, quantile: float = DEFAULT_QUANTILE, max_components: int = MAX_COMPONENTS,
            seed: int = 0, groups=None) -> OodModel:
    """Fit the scorer on `penultimate_features` of the training inputs ((N, V * D); all views of a breast are
    training images) and choose its threshold at `quantile` of cross-fitted training scores (module docstring).
    `groups` (N,): the patient of each input; a patient's inputs never fall in different splits (default: each
    input its own patient).

    The meta reports "false_flag_rate" (cross-fitted share of training breasts above a threshold chosen without
    them), "in_sample_flag_rate" (the final model on its own training inputs), "n_train", "n_groups", "covariance"
    (in words), "quantile", "noise_floor". The cross-fitted models keep the final model's number of components and
    noise floor, so their scores are on the scale the threshold is used on. Raises `DegenerateFeaturesError` when
    the features do not vary beyond float noise (`degenerate_reason`).
    """
    from sklearn.model_selection import GroupKFold

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or views < 1 or features.shape[1] % views:
        raise ValueError(f"OOD training features must be (N, V * D) with V = {views}, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("OOD training features are not all finite")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    n = len(features)
    if n < 2:
        raise ValueError(f"an OOD threshold needs at least 2 training inputs, got {n}")
    groups = np.arange(n) if groups is None else np.asarray(groups).astype(str)
    if groups.shape != (n,):
        raise ValueError(f"groups must give one patient per training input ({n}), got shape {groups.shape}")
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"an OOD threshold needs training inputs of at least 2 patients, got {n_groups}")
    reason = degenerate_reason(features, views)
    if reason is not None:
        raise DegenerateFeaturesError(reason)

    width = features.shape[1] // views
    rows = n * views
    components = (0 if rows < MIN_ROWS_FOR_COVARIANCE else
                  max(1, min(max_components, rows // ROWS_PER_COMPONENT, width - 1)))
    floor = noise_floor(features)  # one floor for the final and the cross-fitted models

    def fitted(part: np.ndarray) -> tuple:
        return _fit_rows(part.reshape(len(part) * views, -1), components, floor / NOISE_FLOOR)

    def breast_scores(params: tuple, part: np.ndarray) -> np.ndarray:
        return _row_scores(part.reshape(len(part) * views, -1), *params[:5]).reshape(len(part), views).max(axis=1)

    splits = min(MAX_SPLITS, n_groups)
    cross_fitted = np.empty(n)
    split_of = np.empty(n, dtype=int)
    folds = GroupKFold(splits, shuffle=True, random_state=seed).split(features, groups=groups)
    for index, (train, test) in enumerate(folds):
        cross_fitted[test] = breast_scores(fitted(features[train]), features[test])
        split_of[test] = index
    flagged = [cross_fitted[split_of == index] > np.quantile(cross_fitted[split_of != index], quantile)
               for index in range(splits)]
    false_flag_rate = float(np.concatenate(flagged).mean())

    mean, scale, components, precision, residual_scale, covariance = params = fitted(features)
    in_sample = breast_scores(params, features)
    # The threshold comes from scores of inputs each model never saw (what new patients are); the in-sample rate is
    # reported beside it. Taking the larger of the two let an over-fitted covariance lift the threshold past chest
    # X-rays (tests/predict/test_ood_end_to_end.py).
    threshold = float(np.quantile(cross_fitted, quantile))
    info = {"quantile": quantile, "false_flag_rate": false_flag_rate,
            "in_sample_flag_rate": float((in_sample > threshold).mean()), "n_train": n, "n_rows": n * views,
            "n_groups": n_groups, "noise_floor": floor, "covariance": covariance, "cross_fitted_splits": splits,
            "seed": seed,
            "features": "pooled penultimate features of every fold model, concatenated per view",
            "score": "squared Mahalanobis distance on the leading principal components of the standardised features "
                     "plus the squared residual off them over its training mean; a breast's score is its largest "
                     "view score" if len(components) else
                     "mean squared standardised feature (diagonal: too few training images for a covariance); a "
                     "breast's score is its largest view score",
            "threshold_from": f"the {quantile:.0%} quantile of {n} cross-fitted training scores ({splits} splits "
                              f"by patient, {n_groups} patients), at least that of the in-sample scores",
            "false_flag_rate_from": f"each of {splits} splits against a threshold chosen on the others' "
                                    "cross-fitted scores"}
    return OodModel(mean=mean, scale=scale, components=components, precision=precision,
                    residual_scale=residual_scale, views=views, threshold=threshold, info=info)


def _fit_rows(rows: np.ndarray, count: int, size: float) -> tuple:
    """(mean, scale, components, precision, residual_scale, covariance in words) of training rows (n, D), on `count`
    principal components (0: the diagonal fallback); spreads floored relative to the features' RMS `size` (module
    docstring)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    mean = rows.mean(axis=0)
    scale = np.maximum(rows.std(axis=0), NOISE_FLOOR * size)
    z = (rows - mean) / scale
    width = rows.shape[1]
    if not count:
        return (mean, scale, np.zeros((0, width)), np.zeros((0, 0)), float(width),
                f"diagonal: too few training view images for a covariance (< {MIN_ROWS_FOR_COVARIANCE})")
    # fit_ood keeps fewer components than rows, so the residual measured on the training rows is not zero.
    pca = PCA(n_components=count, random_state=0).fit(z)  # randomized SVD on large sets, seeded
    projected = pca.transform(z)
    shrunk = LedoitWolf(assume_centered=True).fit(projected)
    # Float noise must not be divided by a vanishing variance: the covariance gets NOISE_MARGIN x the float noise's
    # own covariance (each standardised feature's noise variance, projected), the residual a floor of the same.
    noise = (FLOAT_NOISE * size / scale) ** 2
    basis = pca.components_
    precision = np.linalg.inv(shrunk.covariance_ + NOISE_MARGIN * (basis * noise) @ basis.T)
    residual = z - projected @ basis
    residual_noise = float(noise.sum() - ((basis ** 2) @ noise).sum())
    residual_scale = float(max((residual ** 2).sum(axis=1).mean(), NOISE_MARGIN * residual_noise))
    return (mean, scale, pca.components_.astype(np.float64), precision.astype(np.float64), residual_scale,
            f"Ledoit-Wolf shrinkage {shrunk.shrinkage_:.3f} on {count} principal components of {len(rows)} "
            f"training view images")


def _row_scores(rows: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray,
                precision: np.ndarray, residual_scale: float) -> np.ndarray:
    z = (rows - mean) / scale
    projected = z @ components.T
    inside = np.einsum("ij,jk,ik->i", projected, precision, projected) if len(components) else 0.0
    residual = z - projected @ components
    return inside + (residual ** 2).sum(axis=1) / residual_scale
