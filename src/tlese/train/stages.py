"""Double transfer learning: ImageNet -> chest X-ray (stage 1) -> target task (stage 2).

A stage is (initial weights, data, task, recipe) -> checkpoint. Which stages run is the arm's `transfer` mode:
scratch | imagenet | cxr (random -> CXR -> target) | double (ImageNet -> CXR -> target).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from tlese.files import sha256_file
from tlese.models.spec import ModelSpec
from tlese.train import engine
from tlese.train.config import TRANSFER, Arm, Experiment
from tlese.train.data import PreparedData, make_dataset, prepare
from tlese.train.rundir import EXECUTION_KEYS, ArmDir, read_json, save_json
from tlese.version import __version__

log = logging.getLogger(__name__)


@dataclass
class InitRecord:
    """What a model started from, for the report: every fallback is written down, never silent."""

    imagenet: str  # "loaded" | "not used" | "missing -> scratch"
    cxr_checkpoint: str | None = None  # relative to the arm folder
    cxr_load_summary: str | None = None
    cxr_sha256: str | None = None  # checksum of the stage-1 checkpoint the fold started from

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (Lightning's helper, quietly)."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)


_WARNED_MISSING: set[str] = set()
_LOGGED_STAGE1: set[tuple[str, int]] = set()


def settings(value: dict) -> dict:
    """A recipe or config section without the keys that only change how a job runs (devices, workers, progress)."""
    return {key: item for key, item in value.items() if key not in EXECUTION_KEYS}


def arm_settings(arm: Arm) -> dict:
    return {"model": arm.model, "transfer": arm.transfer, "model_options": arm.model_options,
            "missing_weights": arm.missing_weights}


def stage1_made_from(arm: Arm, experiment: Experiment, data: PreparedData) -> dict:
    """Everything stage 1 of `arm` is computed from (compared before a finished or interrupted stage is reused)."""
    cxr = experiment.cxr
    return {"tlese": __version__, "arm": arm_settings(arm), "seed": experiment.seed,
            "image_size": experiment.image_size, "in_chans": experiment.in_chans,
            "data": {"adapter": cxr.adapter, "task": cxr.task, "options": cxr.options,
                     "fingerprint": data.fingerprint(),
                     "preprocess": data.preprocess},
            "recipe": settings(dataclasses.asdict(experiment.cxr_recipe))}


def model_kwargs(arm: Arm, experiment: Experiment, num_classes: int, views: str) -> dict:
    """`create_model` arguments (besides name and pretrained) of the arm's model; they also rebuild it for a
    checkpoint."""
    kwargs = dict(num_classes=num_classes, in_chans=experiment.in_chans, views=views, **arm.model_options)
    if views == "dual":
        kwargs["fusion"] = experiment.fusion
    return kwargs


def model_spec(arm: Arm, experiment: Experiment, data: PreparedData, views: str) -> ModelSpec:
    """The spec of the model a stage trains on `data`: registry name, `create_model` arguments, the task's classes
    and the preprocessing of the images it really trains on. Recorded with the stage; everything later reads it."""
    from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams

    params = PreprocessParams.from_dict(data.preprocess)
    return ModelSpec(registry_name=arm.model, create_kwargs=model_kwargs(arm, experiment, data.num_classes, views),
                     class_names=list(data.task.classes), preprocess=params.to_dict(),
                     preprocess_fingerprint=params.fingerprint(), preprocess_version=PREPROCESS_VERSION)


def new_model(arm: Arm, experiment: Experiment, num_classes: int, views: str,
              imagenet: bool | None = None) -> tuple[nn.Module, str]:
    """Create the arm's model, with ImageNet weights when its transfer mode uses them (per the missing-weights policy).

    `imagenet` overrides the transfer mode's choice (stage 2 of a CXR arm starts from random weights, then loads
    stage 1).
    """
    from tlese.models import create_model

    kwargs = model_kwargs(arm, experiment, num_classes, views)
    if not (TRANSFER[arm.transfer].imagenet if imagenet is None else imagenet):
        return create_model(arm.model, pretrained=False, **kwargs), "not used"
    try:
        return create_model(arm.model, pretrained=True, **kwargs), "loaded"
    except FileNotFoundError as error:
        if arm.missing_weights == "error":
            raise
        if arm.name not in _WARNED_MISSING:  # once per arm and process: every fold would repeat the same advice
            _WARNED_MISSING.add(arm.name)
            log.warning("arm %s: ImageNet weights missing, starting from scratch as configured: %s", arm.name, error)
        return create_model(arm.model, pretrained=False, **kwargs), "missing -> scratch"


def run_cxr_stage(arm: Arm, experiment: Experiment, arm_dir: ArmDir, resume: bool = True,
                  force: bool = False, data: PreparedData | None = None) -> tuple[Path, dict]:
    """Stage 1: fine-tune the arm's model on chest X-rays; returns the selected checkpoint and the stage's summary.

    The stage is trained once per arm and training seed (repeat): concurrent fold jobs wait on its lock and reuse it.
    Its summary (ImageNet loaded or not, the selected epoch's validation metrics, the checkpoint's checksum) is
    written when it trains and only read afterwards, so a later job on another machine cannot rewrite what stage 1
    started from.
    """
    stage = arm_dir.stage1
    data = data or prepare(experiment.cxr, experiment)
    made_from = stage1_made_from(arm, experiment, data)
    with stage.lock():
        stage.claim(made_from, force=force)
        if stage.is_done() and arm_dir.stage1_summary_file.is_file():
            summary = read_json(arm_dir.stage1_summary_file)
            checkpoint = stage.best_checkpoint()
            if summary.get("best_sha256") != sha256_file(checkpoint):
                raise ValueError(f"{checkpoint}: not the checkpoint {arm_dir.stage1_summary_file} records; delete "
                                 f"{stage.path} to retrain stage 1")
        else:
            summary = _train_cxr_stage(arm, experiment, data, arm_dir, resume)
            checkpoint = stage.best_checkpoint()
    if (arm.name, experiment.seed) not in _LOGGED_STAGE1:  # each fold asks for it; it is trained once per seed
        _LOGGED_STAGE1.add((arm.name, experiment.seed))
        chosen = summary.get("selected") or {}
        log.info("%s stage 1 (chest X-ray, ImageNet %s): %d epochs; selected epoch %s, internal validation accuracy %s",
                 arm.name, summary["imagenet"], summary["epochs"], chosen.get("epoch", "n/a"),
                 f"{chosen['val_acc']:.3f}" if "val_acc" in chosen else "n/a")
    return checkpoint, summary


def _train_cxr_stage(arm: Arm, experiment: Experiment, data: PreparedData, arm_dir: ArmDir, resume: bool) -> dict:
    stage = arm_dir.stage1
    recipe = experiment.cxr_recipe
    train_table, val_table = data.internal_split(recipe.val_fraction, experiment.seed)
    seed_everything(experiment.seed)
    model, imagenet = new_model(arm, experiment, data.num_classes, views="single")
    # The start is recorded once, by the first attempt: a resumed attempt on another machine keeps that record.
    start_file = stage.start_file
    if start_file.is_file():
        recorded = read_json(start_file)["imagenet"]
        if recorded != imagenet and not stage.last_checkpoint.is_file():
            raise RuntimeError(f"{stage.path}: stage 1 started with ImageNet {recorded!r}, but on this machine it "
                               "would "
                               f"be {imagenet!r}; resume it where the weights are, or delete the folder")
        imagenet = recorded
    else:
        save_json(start_file, {"imagenet": imagenet})
    spec = model_spec(arm, experiment, data, views="single")
    result = engine.fit(model, make_dataset(train_table, "single", data.task.modality, train=True, recipe=recipe,
                                            seed=experiment.seed),
                        make_dataset(val_table, "single", data.task.modality, train=False, recipe=recipe),
                        recipe, stage.path, num_classes=data.num_classes, seed=experiment.seed, resume=resume,
                        spec=spec)
    summary = {"imagenet": imagenet, "classes": list(data.task.classes), "train_images": len(train_table),
               "val_images": len(val_table), "train_patients": int(train_table["patient_id"].nunique()),
               "val_patients": int(val_table["patient_id"].nunique()),
               "best_checkpoint": result.best_checkpoint.name, "best_sha256": sha256_file(result.best_checkpoint),
               "selected": result.selected or {}, "epochs": int(len(result.history)), "world_size": result.world_size,
               "model_spec": spec.to_dict()}
    save_json(arm_dir.stage1_summary_file, summary)
    return summary


def initial_model(arm: Arm, experiment: Experiment, num_classes: int, arm_dir: ArmDir, seed: int,
                  resume: bool = True, force: bool = False,
                  cxr_data: PreparedData | None = None) -> tuple[nn.Module, InitRecord]:
    """The model that stage 2 starts from, with the partial-load report of the CXR backbone when one is used."""
    from tlese.models.weights import load_partial

    views = experiment.views
    if not TRANSFER[arm.transfer].cxr:
        seed_everything(seed)
        model, imagenet = new_model(arm, experiment, num_classes, views)
        return model, InitRecord(imagenet=imagenet)
    checkpoint, summary = run_cxr_stage(arm, experiment, arm_dir, resume=resume, force=force, data=cxr_data)
    seed_everything(seed)  # the same initial head whether stage 1 ran now or earlier
    model, _ = new_model(arm, experiment, num_classes, views, imagenet=False)
    # The CXR head is dropped: class sets differ. Every backbone tensor must arrive, or the chain is broken.
    report = load_partial(model, checkpoint, exclude_prefixes=("head.",), strip_prefix="model.")
    log.info("arm %s: %s", arm.name, report.summary())
    if not report.loaded:
        raise RuntimeError(f"{checkpoint}: no backbone tensor matched the stage-2 model ({report.summary()})")
    return model, InitRecord(imagenet=summary["imagenet"],
                             cxr_checkpoint=checkpoint.relative_to(arm_dir.path).as_posix(),
                             cxr_load_summary=report.summary(), cxr_sha256=summary["best_sha256"])


def fold_tables(data: PreparedData, folds: pd.DataFrame, fold: int, val_fraction: float, seed: int):
    """(train, val, test) rows for `fold`; validation is carved from the training folds only, by patient."""
    from tlese.data.splits import split_train_val

    return split_train_val(data.table, folds, fold, val_fraction=val_fraction, seed=seed)
