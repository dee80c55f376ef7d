"""Patient-level k-fold cross-validation of every arm on the same folds, one fold at a time or all of them.

Layout of a run (`<output_dir>/<name>/`):
    config.yaml, environment.json, folds_seed<seed>_k<k>.csv, data_summary.csv
    <arm>/stage1_cxr/                 the CXR stage (shared by all folds: CXR patients never meet mammography folds)
    <arm>/fold_<k>/                   checkpoints, logs, split.csv (patient -> train/val/test), predictions_*.csv
Every fold can run as its own job (`--fold k`); `merge` aggregates whatever folds are finished.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tlese.train import engine
from tlese.train.config import Arm, Experiment, dump_experiment
from tlese.train.data import PreparedData, make_dataset, prepare
from tlese.train.stages import fold_tables, initial_model

log = logging.getLogger(__name__)

PREDICTIONS_IMAGES = "predictions_images.csv"
PREDICTIONS_BREASTS = "predictions_breasts.csv"


def run_dir_of(experiment: Experiment) -> Path:
    return Path(experiment.output_dir) / experiment.name


def _is_global_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def setup_run(experiment: Experiment) -> tuple[Path, PreparedData, pd.DataFrame]:
    """Write the resolved config and environment, prepare the target data, make (or reuse) the folds."""
    from tlese.data.splits import fold_summary, load_folds, make_folds, save_folds
    from tlese.evaluate.report import environment_info

    run_dir = run_dir_of(experiment)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_experiment(experiment, run_dir / "config.yaml")
    environment = {**environment_info(), "seed": experiment.seed}
    (run_dir / "environment.json").write_text(json.dumps(environment, indent=2, default=str))

    data = prepare(experiment.target, experiment)
    folds_path = run_dir / f"folds_seed{experiment.seed}_k{experiment.folds}.csv"
    if experiment.folds_file:
        folds = load_folds(experiment.folds_file)
    elif folds_path.is_file():
        folds = load_folds(folds_path)  # reruns and per-fold jobs must share one split
    else:
        folds = make_folds(data.table, k=experiment.folds, seed=experiment.seed)
        save_folds(folds, folds_path, seed=experiment.seed)
    unknown = set(data.table["patient_id"]) - set(folds["patient_id"])
    if unknown:
        raise ValueError(f"fold file lacks {len(unknown)} patient(s) of the data, e.g. {sorted(unknown)[:3]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = fold_summary(data.table, folds)
    for caught_warning in caught:  # kept for the report, and still shown to the user
        data.notes.append(str(caught_warning.message))
        warnings.warn(caught_warning.message, stacklevel=2)
    summary.to_csv(run_dir / "data_summary.csv", index=False)
    return run_dir, data, folds


def _probability_columns(class_names) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def _prediction_frame(rows: pd.DataFrame, probs: np.ndarray, fold: int, class_names, view: str | None) -> pd.DataFrame:
    frame = pd.DataFrame({
        "fold": fold,
        "patient_id": rows["patient_id"].to_numpy(),
        "side": rows["side"].to_numpy() if "side" in rows else "",
        "view": rows["view"].to_numpy() if view is None else view,
        "target": rows["target"].to_numpy(),
        "pred": probs.argmax(axis=1),
    })
    for column, values in zip(_probability_columns(class_names), probs.T):
        frame[column] = values
    if view is None and "path" in rows:
        frame["path"] = rows["path"].to_numpy()
    return frame


def breast_level(image_predictions: pd.DataFrame, class_names) -> pd.DataFrame:
    """Fuse per-image probabilities into one prediction per breast (mean over its views)."""
    columns = _probability_columns(class_names)
    grouped = image_predictions.groupby(["fold", "patient_id", "side"], sort=True)
    fused = grouped[columns].mean().reset_index()
    fused["target"] = grouped["target"].first().to_numpy()
    fused["view"] = "breast"
    fused["pred"] = fused[columns].to_numpy().argmax(axis=1)
    return fused[["fold", "patient_id", "side", "view", "target", "pred", *columns]]


def assert_no_leakage(split: pd.DataFrame, where: str) -> None:
    """No patient of the test fold may be in the training or validation data of that fold."""
    test = set(split.loc[split["role"] == "test", "patient_id"])
    seen = set(split.loc[split["role"] != "test", "patient_id"])
    leaked = test & seen
    if leaked:
        raise AssertionError(f"{where}: {len(leaked)} test patient(s) also in training/validation, e.g. {sorted(leaked)[:3]}")


def run_fold(experiment: Experiment, arm: Arm, fold: int, data: PreparedData, folds: pd.DataFrame, run_dir: Path,
             resume: bool = True) -> Path:
    """Train stage 2 of `arm` on the other folds and predict the held-out `fold`; returns the fold's folder."""
    fold_dir = run_dir / arm.name / f"fold_{fold}"
    if resume and (fold_dir / PREDICTIONS_IMAGES).is_file():
        log.info("%s fold %d already predicted, skipping", arm.name, fold)
        return fold_dir
    fold_dir.mkdir(parents=True, exist_ok=True)
    recipe = experiment.target_recipe
    train, val, test = fold_tables(data, folds, fold, recipe.val_fraction, experiment.seed)
    split = pd.concat([frame[["patient_id"]].drop_duplicates().assign(role=role)
                       for frame, role in ((train, "train"), (val, "val"), (test, "test"))], ignore_index=True)
    assert_no_leakage(split, str(fold_dir))
    split.to_csv(fold_dir / "split.csv", index=False)

    started = time.time()
    seed = experiment.seed + fold
    # Model initialisation (heads, ESE, scratch arms) is seeded too, inside initial_model.
    model, init = initial_model(arm, experiment, data.num_classes, run_dir / arm.name, seed=seed, resume=resume)
    modality, views = data.task.modality, experiment.views
    result = engine.fit(model, make_dataset(train, views, modality, train=True, recipe=recipe, seed=seed),
                        make_dataset(val, views, modality, train=False, recipe=recipe),
                        recipe, fold_dir, num_classes=data.num_classes, seed=seed, resume=resume)
    if not _is_global_zero():
        return fold_dir
    engine.load_trained_weights(model, result.best_checkpoint)
    class_names = list(data.task.classes)
    test_images = make_dataset(test, views, modality, train=False, recipe=recipe, per_image=True)
    image_predictions = _prediction_frame(test, engine.predict_probs(model, test_images, recipe.batch_size),
                                          fold, class_names, view=None)
    if views == "dual":
        breasts = make_dataset(test, views, modality, train=False, recipe=recipe)
        breast_predictions = _prediction_frame(breasts.breasts, engine.predict_probs(model, breasts, recipe.batch_size),
                                               fold, class_names, view="breast")
    elif modality == "mammo":
        breast_predictions = breast_level(image_predictions, class_names)
    else:
        breast_predictions = None
    if breast_predictions is not None:
        breast_predictions.to_csv(fold_dir / PREDICTIONS_BREASTS, index=False)
    image_predictions.to_csv(fold_dir / PREDICTIONS_IMAGES, index=False)
    (fold_dir / "fold_info.json").write_text(json.dumps({
        "arm": arm.name, "model": arm.model, "transfer": arm.transfer, "fold": fold, "seed": seed,
        "init": init.to_dict(), "train_patients": int(train["patient_id"].nunique()),
        "val_patients": int(val["patient_id"].nunique()), "test_patients": int(test["patient_id"].nunique()),
        "train_images": len(train), "val_images": len(val), "test_images": len(test),
        "best_checkpoint": str(result.best_checkpoint), "epochs_run": result.epochs_run,
        "world_size": result.world_size, "seconds": round(time.time() - started, 1), "run_by": _run_by(),
    }, indent=2))
    log.info("%s fold %d: %d epochs in %.0f s; %d held-out images of %d patients predicted", arm.name, fold,
             result.epochs_run, time.time() - started, len(test), test["patient_id"].nunique())
    return fold_dir


def _run_by() -> dict:
    """Code and machine state of this fold's job: arms and folds of one run may come from different jobs and commits."""
    import torch

    from tlese.evaluate.report import environment_info

    keys = ("date_utc", "git_commit", "git_dirty", "tlese", "torch", "cpu", "gpu")
    return {**{key: value for key, value in environment_info().items() if key in keys},
            "torch_threads": torch.get_num_threads()}


def run_cv(experiment: Experiment, arms: list[str] | None = None, fold: int | None = None,
           resume: bool = True) -> Path:
    """Run the chosen arms (default: all) on the chosen fold (default: all) and return the run folder."""
    run_dir, data, folds = setup_run(experiment)
    chosen = [experiment.arm(name) for name in arms] if arms else experiment.arms
    fold_ids = sorted(folds["fold"].unique()) if fold is None else [fold]
    if fold is not None and fold not in set(folds["fold"]):
        raise ValueError(f"fold {fold} does not exist; folds: {sorted(folds['fold'].unique())}")
    (run_dir / "notes.json").write_text(json.dumps(data.notes, indent=2))
    for arm in chosen:
        for fold_id in fold_ids:
            run_fold(experiment, arm, int(fold_id), data, folds, run_dir, resume=resume)
    return run_dir
