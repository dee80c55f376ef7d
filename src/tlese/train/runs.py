"""A finished run, opened for reading: the one reader that merge, repeats, the bundle maker and explain share.

`FinishedRun(run_dir)` answers for the run's config (`experiment`), its arms and repeats, each fold's model spec (from
the fold's record, never recomputed from the config), the checked out-of-fold predictions of an arm (`predictions`,
what `collect_arm` gives) and a fold's trained model (`trained`). Nothing here trains or writes.

Before predictions are handed out, every finished fold is checked: they hold exactly its test patients of the run's
fold file (each unit once, none missing), its split agrees with the fold file, and all folds of an arm were made from
the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from tlese.models.spec import ModelSpec
from tlese.train.config import Arm, Experiment, load_experiment
from tlese.train.rundir import ArmDir, FoldDir, RunDir, assert_no_leakage, read_json, repeat_seed

if TYPE_CHECKING:
    from torch import nn


@dataclass
class ArmResults:
    """One arm's checked predictions and records (of one repeat)."""

    arm: Arm
    arm_dir: ArmDir
    predictions: pd.DataFrame  # breasts when the run has them, else images
    images: pd.DataFrame | None
    unit: str
    records: list[dict]
    missing_folds: list[int] = field(default_factory=list)


@dataclass
class TrainedFold:
    """A fold's model as it predicted, with what is needed to feed it and read its outputs."""

    model: nn.Module
    experiment: Experiment
    arm: Arm
    fold_dir: FoldDir
    checkpoint: Path
    class_names: list[str]
    spec: ModelSpec


class FinishedRun:
    """A cross-validation run folder with its resolved config; `overrides` (`key=value`, as for `tlese cv --set`)
    point at data that has moved. Folds still running are simply not finished yet."""

    def __init__(self, run_dir: str | Path, overrides: list[str] | None = None):
        self.dir = RunDir(Path(run_dir))
        self.dir.require()
        self.experiment = load_experiment(self.dir.config_file, overrides or [])

    @property
    def path(self) -> Path:
        return self.dir.path

    def __repr__(self) -> str:
        return f"FinishedRun({str(self.path)!r})"

    # What the run is ---------------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        """The resolved config as written (for the report)."""
        return yaml.safe_load(self.dir.config_file.read_text())

    @cached_property
    def environment(self) -> dict:
        return read_json(self.dir.environment_file) if self.dir.environment_file.is_file() else {}

    def notes(self) -> list[str]:
        return self.dir.notes()

    def data_summary(self, repeat: int = 0) -> pd.DataFrame | None:
        path = self.dir.data_summary_file_of(repeat)
        return pd.read_csv(path, keep_default_na=False) if path.is_file() else None

    @property
    def arms(self) -> list[Arm]:
        return list(self.experiment.arms)

    def arm(self, name: str) -> Arm:
        return self.experiment.arm(name)

    @cached_property
    def task(self):
        """The target task the run trained on (a registered name or the config's inline task)."""
        from tlese.data.tasks import get_task

        return get_task(self.experiment.target.task)

    @property
    def class_names(self) -> list[str]:
        return list(self.task.classes)

    @property
    def repeats(self) -> int:
        """How many repeats the run has: the config's, or more when folders of later repeats exist."""
        found = [max(self.dir.arm_repeats(arm.name), default=0) + 1 for arm in self.arms]
        return max([self.experiment.repeats, *found])

    def folds_file(self, repeat: int = 0) -> Path:
        return self.dir.folds_file(repeat_seed(self.experiment.seed, repeat), self.experiment.folds)

    def folds(self, repeat: int = 0) -> pd.DataFrame | None:
        """The repeat's fold file (patient -> fold), None when that repeat has drawn none yet."""
        from tlese.data.splits import load_folds

        path = self.folds_file(repeat)
        return load_folds(path) if path.is_file() else None

    def arm_dir(self, arm: str, repeat: int = 0) -> ArmDir:
        return self.dir.arm(self.arm(arm).name, repeat)

    def finished_folds(self, arm: str, repeat: int = 0) -> list[FoldDir]:
        """The folds of the arm that have predicted (record written), in fold order."""
        return self.arm_dir(arm, repeat).predicted_folds()

    # What each fold trained ----------------------------------------------------------------------------------------
    def model_spec(self, arm: str, fold: int, repeat: int = 0) -> ModelSpec:
        """The spec fold `fold` recorded when it trained (a fold made before specs were recorded: a clear error)."""
        return self.arm_dir(arm, repeat).fold(fold).model_spec()

    def model_specs(self, arm: str, repeat: int = 0) -> dict[int, ModelSpec]:
        """The spec of every finished fold of the arm, by fold."""
        return {fold_dir.fold: fold_dir.model_spec() for fold_dir in self.finished_folds(arm, repeat)}

    def predictions(self, arm: str, repeat: int = 0) -> ArmResults | None:
        """The arm's checked out-of-fold predictions of one repeat; None when no fold of it has finished."""
        folds = self.folds(repeat)
        if folds is None:
            if repeat == 0 and any(self.finished_folds(arm)):
                raise FileNotFoundError(f"{self.folds_file(0)}: the run's fold file is missing; predictions cannot be "
                                        "checked")
            return None
        return collect_arm(self.dir, self.arm(arm), folds, repeat)

    def trained(self, arm: str, fold: int, repeat: int = 0) -> TrainedFold:
        """Fold `fold`'s model rebuilt from the spec its record carries, with the checkpoint it predicted with
        (verified against its recorded checksum). In eval mode, on the CPU."""
        from tlese.train import engine

        fold_dir = self.arm_dir(arm, repeat).fold(fold)
        spec = fold_dir.model_spec()
        checkpoint = fold_dir.best_checkpoint()
        model = engine.load_trained_weights(spec.build(), checkpoint, spec).eval()
        return TrainedFold(model, self.experiment, self.arm(arm), fold_dir, checkpoint, list(spec.class_names), spec)


# ---------------------------------------------------------------------------------------------------------------------
# Checked predictions of one arm


def _check_fold(fold_dir: FoldDir, frame: pd.DataFrame, fold_patients: set[str], where: Path) -> None:
    """The fold's predictions are of its own test patients in the run's fold file, all of them, each unit once."""
    from tlese.evaluate.metrics import check_unique_units, unit_key_columns

    split = fold_dir.split()
    assert_no_leakage(split, str(fold_dir.path))
    recorded_test = set(split.loc[split["role"] == "test", "patient_id"])
    if recorded_test != fold_patients:
        raise AssertionError(f"{fold_dir.split_file}: its test patients differ from fold {fold_dir.fold} of the run's "
                             f"fold file ({len(recorded_test ^ fold_patients)} differ)")
    if set(frame["fold"].astype(int)) != {fold_dir.fold}:
        raise AssertionError(f"{where}: rows labelled with another fold than {fold_dir.fold}")
    predicted = set(frame["patient_id"])
    outside, missing = predicted - fold_patients, fold_patients - predicted
    if outside:
        raise AssertionError(f"{where}: predictions for patients outside test fold {fold_dir.fold}, "
                             f"e.g. {sorted(outside)[:3]}")
    if missing:
        raise AssertionError(f"{where}: {len(missing)} test patient(s) of fold {fold_dir.fold} have no prediction, "
                             f"e.g. {sorted(missing)[:3]}")
    check_unique_units(frame, unit_key_columns(frame), str(where))


def _arm_predictions(arm_dir: ArmDir, unit: str, folds: pd.DataFrame) -> pd.DataFrame | None:
    """The checked predictions of every finished fold of the arm (`unit` "images" or "breasts")."""
    from tlese.evaluate.metrics import check_unique_units, unit_key_columns

    frames = []
    for fold_dir in arm_dir.predicted_folds():
        frame = fold_dir.predictions(unit)
        if frame is None:
            continue
        fold_patients = set(folds.loc[folds["fold"] == fold_dir.fold, "patient_id"])
        path = fold_dir.image_predictions_file if unit == "images" else fold_dir.breast_predictions_file
        _check_fold(fold_dir, frame, fold_patients, path)
        frames.append(frame)
    if not frames:
        return None
    merged = pd.concat(frames, ignore_index=True)
    check_unique_units(merged, unit_key_columns(merged), f"{arm_dir.path} (all folds)")  # no unit in two folds
    return merged


def _check_records(arm_dir: ArmDir, records: list[dict]) -> None:
    """All finished folds of an arm were made from the same settings (the fold number aside)."""
    made_from = {record.get("made_from") for record in records}
    if len(made_from) > 1:
        by_fold = {record["fold"]: record.get("made_from") for record in records}
        raise AssertionError(f"{arm_dir.path}: its folds were made from different settings ({by_fold}); rerun "
                             "`tlese cv` for this run, which names what changed, or start a new run")


def collect_arm(run: RunDir, arm: Arm, folds: pd.DataFrame, repeat: int = 0) -> ArmResults | None:
    """One arm's checked predictions of one repeat (`folds`: that repeat's fold file); None when no fold finished."""
    arm_dir = run.arm(arm.name, repeat)
    breasts = _arm_predictions(arm_dir, "breasts", folds)
    images = _arm_predictions(arm_dir, "images", folds)
    predictions = breasts if breasts is not None else images
    if predictions is None:
        return None
    records = [fold_dir.record() for fold_dir in arm_dir.predicted_folds()]
    _check_records(arm_dir, records)
    finished = {record["fold"] for record in records}
    missing = sorted(int(k) for k in set(folds["fold"]) - finished)
    return ArmResults(arm, arm_dir, predictions, images if breasts is not None else None,
                      "breast" if breasts is not None else "image", records, missing)
