"""Patient-level k-fold cross-validation of every arm on the same folds, one fold at a time or all of them.

The run folder's layout and its records belong to `tlese.train.rundir`. Every (repeat, fold) can run as its own job
(`--repeat i --fold k`); `merge` aggregates whatever folds are finished. Repeat i of a repeated CV is the same
experiment with its own seed (`Experiment.for_repeat`): its own patient-level folds and training seed. Before
anything is reused it is checked against what made it; a changed setting is refused (or, with `force`, retrained),
never silently credited.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tlese.train import engine
from tlese.train.config import Arm, Experiment, dump_experiment, load_experiment
from tlese.train.data import PreparedData, make_dataset, prepare
from tlese.train.rundir import (
    EXECUTION_KEYS,
    RUN_ONLY_KEYS,
    ArmDir,
    FoldDir,
    RunDir,
    StaleRunError,
    assert_no_leakage,
    differences,
    fingerprint,
    naming_failed_writes,
    save_json,
    save_text,
)
from tlese.train.stages import arm_settings, fold_tables, initial_model, model_spec, settings, stage1_made_from
from tlese.version import __version__

log = logging.getLogger(__name__)


def run_dir_of(experiment: Experiment) -> Path:
    return RunDir.of(experiment).path


def _is_global_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# ---------------------------------------------------------------------------------------------------------------
# Before any work: the whole config is checked


def check_experiment(experiment: Experiment, arms: list[str] | None = None) -> list[Arm]:
    """Everything that can be checked without data: arm names, models and their options, tasks, adapters, roots,
    augmentation keys. Returns the chosen arms. Fails in a second, not after the data is prepared."""
    from tlese.data.datasets import get_adapter
    from tlese.data.tasks import get_task
    from tlese.data.transforms import build_transforms
    from tlese.models import create_model
    from tlese.train.stages import model_kwargs

    chosen = [experiment.arm(name) for name in arms] if arms else list(experiment.arms)
    sources = [("target", experiment.target, experiment.target_recipe)]
    if any(engine_uses_cxr(arm) for arm in chosen):
        sources.append(("cxr", experiment.cxr, experiment.cxr_recipe))
    for key, source, recipe in sources:
        get_adapter(source.adapter)
        task = get_task(source.task)
        if not Path(source.root).exists():
            raise FileNotFoundError(f"{key}.root: {source.root} does not exist")
        for modality, cfg in recipe.augment.items():
            build_transforms(modality, train=True, cfg=cfg or None)
        if key == "target":
            num_classes = len(task.classes)
    for arm in chosen:
        try:  # the smallest build that runs the arm's own registry lookup and option checks
            create_model(arm.model, pretrained=False, **model_kwargs(arm, experiment, num_classes, experiment.views))
        except (ValueError, TypeError) as error:
            raise ValueError(f"arm {arm.name}: {error}") from None
    return chosen


def engine_uses_cxr(arm: Arm) -> bool:
    from tlese.train.config import TRANSFER

    return TRANSFER[arm.transfer].cxr


# ---------------------------------------------------------------------------------------------------------------
# The run: config, data, folds


def _comparable(config: dict) -> dict:
    """The part of a resolved config that decides results (not paths, workers, devices or report settings)."""
    kept = {key: value for key, value in config.items() if key not in RUN_ONLY_KEYS}
    for key in ("target", "cxr"):
        kept[key] = {name: value for name, value in kept[key].items() if name != "root"}
    for key in ("cxr_recipe", "target_recipe"):
        kept[key] = {name: value for name, value in kept[key].items() if name not in EXECUTION_KEYS}
    return kept


def _settle_config(experiment: Experiment, run: RunDir, force: bool) -> None:
    """Write the resolved config of a new run; for an existing run, refuse changed settings (or, with `force`,
    record the new ones) and add arms that are new. The config that finished folds came from is never rewritten."""
    current = experiment.to_dict()
    if not run.config_file.is_file():
        with naming_failed_writes(run.config_file):
            dump_experiment(experiment, run.config_file)
        return
    recorded = yaml.safe_load(run.config_file.read_text())
    changed = differences(_comparable(recorded), _comparable(current))
    recorded_arms = {arm["name"]: arm for arm in recorded.get("arms", [])}
    for arm in current["arms"]:
        if arm["name"] in recorded_arms:
            changed += differences(recorded_arms[arm["name"]], arm, f"arms[{arm['name']}].")
    if changed and not force:
        raise StaleRunError(f"{run.path} was made with other settings ({'; '.join(changed[:8])}). Start a new run "
                            f"(--set name=NEW), or retrain what they change with --force")
    if force and changed:
        merged = {**current, "arms": [*current["arms"],
                                      *[arm for name, arm in recorded_arms.items()
                                        if name not in {a["name"] for a in current["arms"]}]]}
    else:
        new_arms = [arm for arm in current["arms"] if arm["name"] not in recorded_arms]
        more_repeats = current["repeats"] > recorded.get("repeats", 1)  # repeats added later: the others stand
        if not new_arms and not more_repeats:
            return
        merged = {**recorded, "arms": [*recorded["arms"], *new_arms],
                  "repeats": max(current["repeats"], recorded.get("repeats", 1))}
    save_text(run.config_file, yaml.safe_dump(merged, sort_keys=False))


def _folds_for(experiment: Experiment, run: RunDir, data: PreparedData) -> pd.DataFrame:
    """The run's folds: the saved ones (checked against the data), a given fold file (checked, copied in), or new."""

    with run.folds_lock():  # jobs of one repeat starting together draw its folds once
        return _locked_folds_for(experiment, run, data)


def _locked_folds_for(experiment: Experiment, run: RunDir, data: PreparedData) -> pd.DataFrame:
    from tlese.data.splits import load_folds, make_folds, save_folds

    saved = run.folds_file(experiment.seed, experiment.folds)
    if saved.is_file():
        folds = load_folds(saved, data.table, strict=True)
    elif experiment.folds_file:
        folds = load_folds(experiment.folds_file, data.table, strict=True)
        save_folds(folds, saved, seed=folds.attrs.get("seed"), source=f"copy of {Path(experiment.folds_file).name}")
    else:
        folds = make_folds(data.table, k=experiment.folds, seed=experiment.seed)
        save_folds(folds, saved, seed=experiment.seed)
    if folds["fold"].nunique() != experiment.folds:
        raise ValueError(f"{saved}: {folds['fold'].nunique()} folds, but the experiment asks for {experiment.folds}")
    return folds


def setup_run(experiment: Experiment, force: bool = False) -> tuple[Path, PreparedData]:
    """Settle the run's config and prepare the target data."""
    from tlese.provenance import environment_info

    run = RunDir.of(experiment)
    run.path.mkdir(parents=True, exist_ok=True)
    _settle_config(experiment, run, force)
    if not run.environment_file.is_file():  # each fold job records its own; this is the run's first
        save_json(run.environment_file, {**environment_info(), "seed": experiment.seed})

    return run.path, prepare(experiment.target, experiment)


def repeat_folds(experiment: Experiment, run: RunDir, data: PreparedData, repeat: int) -> tuple[Experiment,
                                                                                                pd.DataFrame]:
    """Repeat `repeat` of the experiment (its seed) and its folds: saved ones (checked), a given fold file, or new;
    the folds' class counts go to the repeat's data summary and their warnings to the run's notes."""
    from tlese.data.splits import fold_summary

    repeated = experiment.for_repeat(repeat)
    folds = _folds_for(repeated, run, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = fold_summary(data.table, folds)
    for caught_warning in caught:  # kept for the report, and still shown to the user
        message = str(caught_warning.message)
        data.notes.append(message if experiment.repeats == 1 else f"repeat {repeat}: {message}")
        warnings.warn(caught_warning.message, stacklevel=2)
    summary.to_csv(run.data_summary_file_of(repeat), index=False)
    return repeated, folds


def folds_fingerprint(folds: pd.DataFrame) -> str:
    rows = sorted(f"{patient}\t{fold}" for patient, fold in folds[["patient_id", "fold"]].itertuples(index=False))
    return fingerprint(rows)


def fold_made_from(experiment: Experiment, arm: Arm, data: PreparedData, folds: pd.DataFrame,
                   stage1: dict | None) -> dict:
    """Everything one fold's predictions are computed from (compared before the fold is reused)."""
    target = experiment.target
    return {"tlese": __version__, "arm": arm_settings(arm), "seed": experiment.seed,
            "image_size": experiment.image_size, "in_chans": experiment.in_chans, "views": experiment.views,
            "fusion": experiment.fusion,
            "data": {"adapter": target.adapter, "task": target.task, "options": target.options,
                     "fingerprint": data.fingerprint(), "preprocess": data.preprocess},
            "folds": folds_fingerprint(folds), "recipe": settings(dataclasses.asdict(experiment.target_recipe)),
            "stage1": stage1}


# ---------------------------------------------------------------------------------------------------------------
# One fold


def _probability_columns(class_names) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def _image_ids(rows: pd.DataFrame, root: str) -> np.ndarray:
    """Each image's path relative to the data root (never an absolute path: folder names can hold dates)."""
    if "image_id" in rows and rows["image_id"].astype(str).str.len().gt(0).all():
        return rows["image_id"].astype(str).to_numpy()
    base = Path(root).resolve()

    def relative(path: str) -> str:
        try:
            return Path(path).resolve().relative_to(base).as_posix()
        except ValueError:
            return Path(path).name

    return rows["path"].map(relative).to_numpy()


def _prediction_frame(rows: pd.DataFrame, probs: np.ndarray, fold: int, class_names, view: str | None,
                      root: str = "") -> pd.DataFrame:
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
    if view is None and ("path" in rows or "image_id" in rows):
        frame["image_id"] = _image_ids(rows, root)
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


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    save_text(path, frame.to_csv(index=False))


def run_fold(experiment: Experiment, arm: Arm, fold: int, data: PreparedData, folds: pd.DataFrame, run_dir: Path,
             resume: bool = True, force: bool = False, cxr_data: PreparedData | None = None,
             repeat: int = 0) -> Path:
    """Train stage 2 of `arm` on the other folds and predict the held-out `fold`; returns the fold's folder.

    `experiment` and `folds` are those of `repeat` (see repeat_folds). `cxr_data`: the prepared stage-1 data, when the
    caller has it already (it is prepared here otherwise)."""
    run = RunDir(run_dir)
    arm_dir = run.arm(arm.name, repeat)
    fold_dir = arm_dir.fold(fold)
    stage1 = None
    if engine_uses_cxr(arm):
        cxr_data = cxr_data or prepare(experiment.cxr, experiment)
        stage1 = stage1_made_from(arm, experiment, cxr_data)
    made_from = fold_made_from(experiment, arm, data, folds, stage1)
    with fold_dir.lock():
        if not resume:
            fold_dir.clear()
        fold_dir.claim(made_from, force=force)
        if fold_dir.is_predicted():
            log.info("%s repeat %d fold %d already predicted from the same settings, skipping", arm.name, repeat,
                     fold)
            return fold_dir.path
        _train_and_predict(experiment, arm, arm_dir, fold_dir, data, folds, force, made_from, cxr_data)
    return fold_dir.path


def _train_and_predict(experiment: Experiment, arm: Arm, arm_dir: ArmDir, fold_dir: FoldDir, data: PreparedData,
                       folds: pd.DataFrame, force: bool, made_from: dict, cxr_data: PreparedData | None) -> None:
    """Train (or resume) the fold's stage 2 and write its split, predictions and record (the record last)."""
    fold = fold_dir.fold
    recipe = experiment.target_recipe
    train, val, test = fold_tables(data, folds, fold, recipe.val_fraction, experiment.seed)
    split = pd.concat([frame[["patient_id"]].drop_duplicates().assign(role=role)
                       for frame, role in ((train, "train"), (val, "val"), (test, "test"))], ignore_index=True)
    assert_no_leakage(split, str(fold_dir.path))
    _write_csv_atomic(split, fold_dir.split_file)

    started = time.time()
    seed = experiment.seed + fold
    # Model initialisation (heads, ESE, scratch arms) is seeded too, inside initial_model.
    model, init = initial_model(arm, experiment, data.num_classes, arm_dir, seed=seed, force=force,
                                cxr_data=cxr_data)
    modality, views = data.task.modality, experiment.views
    spec = model_spec(arm, experiment, data, views)  # what this fold trains: recorded, never recomputed later
    result = engine.fit(model, make_dataset(train, views, modality, train=True, recipe=recipe, seed=seed),
                        make_dataset(val, views, modality, train=False, recipe=recipe),
                        recipe, fold_dir.path, num_classes=data.num_classes, seed=seed, spec=spec)
    if not _is_global_zero():
        return
    engine.load_trained_weights(model, fold_dir.best_checkpoint())
    class_names = list(data.task.classes)
    root = experiment.target.root
    test_images = make_dataset(test, views, modality, train=False, recipe=recipe, per_image=True)
    image_predictions = _prediction_frame(test, engine.predict_probs(model, test_images, recipe.batch_size),
                                          fold, class_names, view=None, root=root)
    breast_predictions = None
    if views == "dual":
        breasts = make_dataset(test, views, modality, train=False, recipe=recipe)
        breast_predictions = _prediction_frame(breasts.breasts, engine.predict_probs(model, breasts, recipe.batch_size),
                                               fold, class_names, view="breast")
    elif modality == "mammo":
        breast_predictions = breast_level(image_predictions, class_names)
    if breast_predictions is not None:
        _write_csv_atomic(breast_predictions, fold_dir.breast_predictions_file)
    _write_csv_atomic(image_predictions, fold_dir.image_predictions_file)
    # The record is written last: a fold counts as predicted only once it exists (see FoldDir.is_predicted).
    save_json(fold_dir.record_file, {
        "arm": arm.name, "model": arm.model, "transfer": arm.transfer, "repeat": arm_dir.repeat, "fold": fold,
        "seed": seed, "model_spec": spec.to_dict(),
        "made_from": fingerprint(made_from), "init": init.to_dict(),
        "train_patients": int(train["patient_id"].nunique()), "val_patients": int(val["patient_id"].nunique()),
        "test_patients": int(test["patient_id"].nunique()), "train_images": len(train), "val_images": len(val),
        "test_images": len(test), "best_checkpoint": result.best_checkpoint.name, "selected": result.selected,
        "epochs_run": result.epochs_run, "world_size": result.world_size, "seconds": round(time.time() - started, 1),
        "run_by": _run_by(),
    })
    log.info("%s repeat %d fold %d: %d epochs in %.0f s; %d held-out images of %d patients predicted", arm.name,
             arm_dir.repeat, fold, result.epochs_run, time.time() - started, len(test), test["patient_id"].nunique())


def _run_by() -> dict:
    """Code and machine state of this fold's job: arms and folds of one run may come from different jobs and commits."""
    import torch

    from tlese.provenance import environment_info

    keys = ("date_utc", "git_commit", "git_dirty", "tlese", "torch", "cpu", "gpu")
    return {**{key: value for key, value in environment_info().items() if key in keys},
            "torch_threads": torch.get_num_threads()}


def run_cv(experiment: Experiment, arms: list[str] | None = None, fold: int | None = None,
           resume: bool = True, force: bool = False, repeat: int | None = None) -> Path:
    """Run the chosen arms (default: all) on the chosen fold (default: all) of the chosen repeat (default: all) and
    return the run folder. Repeats run one after the other, each arm's stage 1 once per repeat (its training seed)."""
    chosen = check_experiment(experiment, arms)
    if fold is not None and not 0 <= fold < experiment.folds:
        raise ValueError(f"fold {fold} does not exist; folds: 0..{experiment.folds - 1}")
    if repeat is not None and not 0 <= repeat < experiment.repeats:
        raise ValueError(f"repeat {repeat} does not exist; repeats: 0..{experiment.repeats - 1} (set `repeats`)")
    run_dir, data = setup_run(experiment, force=force)
    run = RunDir(run_dir)
    repeats = range(experiment.repeats) if repeat is None else [repeat]
    planned = [(index, *repeat_folds(experiment, run, data, index)) for index in repeats]
    cxr_data = prepare(experiment.cxr, experiment) if any(engine_uses_cxr(arm) for arm in chosen) else None
    run.add_notes(data.notes + (cxr_data.notes if cxr_data else []))  # merged with other jobs' notes, under a lock
    for index, repeated, folds in planned:
        fold_ids = sorted(folds["fold"].unique()) if fold is None else [fold]
        if not resume:  # retrain the chosen folds, and stage 1 only when all its folds are retrained (not per job)
            for arm in chosen:
                arm_dir = run.arm(arm.name, index)
                for stage in [*(arm_dir.fold(k) for k in fold_ids), *([arm_dir.stage1] if fold is None else [])]:
                    with stage.lock():
                        stage.clear()
        for arm in chosen:
            for fold_id in fold_ids:
                run_fold(repeated, arm, int(fold_id), data, folds, run_dir, force=force, cxr_data=cxr_data,
                         repeat=index)
    return run_dir


def reload_experiment(run_dir: str | Path, overrides: list[str] | None = None) -> Experiment:
    """The experiment a run folder was made with (its resolved config), with optional `key=value` overrides."""
    run = RunDir(Path(run_dir))
    run.require()
    return load_experiment(run.config_file, overrides or [])
