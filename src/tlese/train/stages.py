"""Double transfer learning: ImageNet -> chest X-ray (stage 1) -> target task (stage 2).

A stage is (initial weights, data, task, recipe) -> checkpoint. Which stages run is the arm's `transfer` mode:
scratch | imagenet | cxr (random -> CXR -> target) | double (ImageNet -> CXR -> target).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from tlese.train.config import Arm, Experiment
from tlese.train.data import PreparedData, make_dataset, prepare
from tlese.train import engine

log = logging.getLogger(__name__)

USES_IMAGENET = {"scratch": False, "imagenet": True, "cxr": False, "double": True}
USES_CXR = {"scratch": False, "imagenet": False, "cxr": True, "double": True}


@dataclass
class InitRecord:
    """What a model started from, for the report: every fallback is written down, never silent."""

    imagenet: str  # "loaded" | "not used" | "missing -> scratch"
    cxr_checkpoint: str | None = None
    cxr_load_summary: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (Lightning's helper, quietly)."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)


_WARNED_MISSING: set[str] = set()
_LOGGED_STAGE1: set[str] = set()


def model_kwargs(arm: Arm, experiment: Experiment, num_classes: int, views: str) -> dict:
    """`create_model` arguments (besides name and pretrained) of the arm's model: also rebuilds it to load a checkpoint."""
    kwargs = dict(num_classes=num_classes, in_chans=experiment.in_chans, views=views, **arm.model_options)
    if views == "dual":
        kwargs["fusion"] = experiment.fusion
    return kwargs


def new_model(arm: Arm, experiment: Experiment, num_classes: int, views: str) -> tuple[nn.Module, str]:
    """Create the arm's model with ImageNet weights when its transfer mode uses them (per the missing-weights policy)."""
    from tlese.models import create_model

    kwargs = model_kwargs(arm, experiment, num_classes, views)
    if not USES_IMAGENET[arm.transfer]:
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


def run_cxr_stage(arm: Arm, experiment: Experiment, arm_dir: Path, resume: bool = True) -> tuple[Path, dict]:
    """Stage 1: fine-tune the arm's model on chest X-rays; returns the best checkpoint and a summary."""
    stage_dir = arm_dir / "stage1_cxr"
    data = prepare(experiment.cxr, experiment)
    train_table, val_table = data.internal_split(experiment.cxr_recipe.val_fraction, experiment.seed)
    seed_everything(experiment.seed)
    model, imagenet = new_model(arm, experiment, data.num_classes, views="single")
    recipe = experiment.cxr_recipe
    result = engine.fit(model, make_dataset(train_table, "single", data.task.modality, train=True, recipe=recipe, seed=experiment.seed),
                        make_dataset(val_table, "single", data.task.modality, train=False, recipe=recipe),
                        recipe, stage_dir, num_classes=data.num_classes, seed=experiment.seed, resume=resume)
    history = result.history
    summary = {"imagenet": imagenet, "classes": list(data.task.classes), "train_images": len(train_table),
               "val_images": len(val_table), "best_checkpoint": str(result.best_checkpoint),
               "best_val_acc": float(history["val_acc"].max()) if "val_acc" in history and len(history) else None,
               "epochs": int(len(history))}
    (stage_dir / "stage_summary.json").write_text(json.dumps(summary, indent=2))
    if arm.name not in _LOGGED_STAGE1:  # each fold asks for the stage-1 checkpoint; it is trained once
        _LOGGED_STAGE1.add(arm.name)
        log.info("%s stage 1 (chest X-ray, ImageNet %s): %d epochs, best internal validation accuracy %s", arm.name,
                 imagenet, summary["epochs"],
                 "n/a" if summary["best_val_acc"] is None else f"{summary['best_val_acc']:.3f}")
    return result.best_checkpoint, summary


def initial_model(arm: Arm, experiment: Experiment, num_classes: int, arm_dir: Path, seed: int,
                  resume: bool = True) -> tuple[nn.Module, InitRecord]:
    """The model that stage 2 starts from, with the partial-load report of the CXR backbone when one is used."""
    from tlese.models.weights import load_partial

    views = experiment.views
    if not USES_CXR[arm.transfer]:
        seed_everything(seed)
        model, imagenet = new_model(arm, experiment, num_classes, views)
        return model, InitRecord(imagenet=imagenet)
    checkpoint, summary = run_cxr_stage(arm, experiment, arm_dir, resume=resume)
    seed_everything(seed)  # the same initial head whether stage 1 ran now or earlier
    model, _ = new_model(Arm(**{**arm.__dict__, "transfer": "scratch"}), experiment, num_classes, views)
    # The CXR head is dropped: class sets differ. Every backbone tensor must arrive, or the chain is broken.
    report = load_partial(model, checkpoint, exclude_prefixes=("head.",), strip_prefix="model.")
    log.info("arm %s: %s", arm.name, report.summary())
    if not report.loaded:
        raise RuntimeError(f"{checkpoint}: no backbone tensor matched the stage-2 model ({report.summary()})")
    return model, InitRecord(imagenet=summary["imagenet"], cxr_checkpoint=str(checkpoint), cxr_load_summary=report.summary())


def fold_tables(data: PreparedData, folds: pd.DataFrame, fold: int, val_fraction: float, seed: int):
    """(train, val, test) rows for `fold`; validation is carved from the training folds only, by patient."""
    from tlese.data.splits import split_train_val

    return split_train_val(data.table, folds, fold, val_fraction=val_fraction, seed=seed)
