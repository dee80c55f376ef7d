"""From a config's data source to torch datasets: adapter -> task labels -> prepared (cached) images -> datasets."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from tlese.train.config import DataSource, Experiment, Recipe

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """An encoded, prepared table and its task; `notes` collects every skip and fallback for the report."""

    table: pd.DataFrame
    task: object
    preprocess: dict
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.task.classes)

    def fingerprint(self) -> str:
        """What the images and labels are: rows (patient, side, view, target, image, content hash) and the
        preprocessing folder each prepared file is in (named by the parameters' fingerprint), so a changed label,
        image or preprocessing changes this fingerprint, and moving the data does not."""
        import hashlib

        columns = [column for column in ("patient_id", "side", "view", "target", "image_id", "source_sha256")
                   if column in self.table.columns]
        # With the source's content hash, the preprocessing folder is enough (data may move); without, the file name.
        keep = 1 if "source_sha256" in columns else 2
        frame = self.table[columns].astype(str).assign(
            prepared=self.table["prepared_path"].map(lambda path: "/".join(Path(path).parent.parts[-1:]
                                                                           + Path(path).parts[-1:][:keep - 1])))
        lines = sorted("\t".join(row) for row in frame.itertuples(index=False, name=None))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    def internal_split(self, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Patient-level train/validation split of the whole table (used by stage 1, which has no test fold)."""
        from tlese.data.splits import make_folds

        k = max(2, int(round(1.0 / val_fraction)))
        folds = make_folds(self.table, k=k, seed=seed)
        val_patients = set(folds.loc[folds["fold"] == 0, "patient_id"])
        is_val = self.table["patient_id"].isin(val_patients)
        return self.table[~is_val].reset_index(drop=True), self.table[is_val].reset_index(drop=True)


def prepare(source: DataSource, experiment: Experiment, preprocess: dict | None = None) -> PreparedData:
    """Read the source with its adapter, encode the task's labels, prepare every image once (cached).

    The images are prepared with the experiment's `image_size` and `preprocess` section, or with `preprocess` (a
    recorded `PreprocessParams.to_dict()`, e.g. a trained model's spec) when given."""
    from tlese.data.cache import prepare_table
    from tlese.data.datasets import format_skipped, get_adapter
    from tlese.data.preprocess import PreprocessParams
    from tlese.data.tasks import get_task

    task = get_task(source.task)
    table = get_adapter(source.adapter)(source.root, **source.options)
    notes = []
    skipped = table.attrs.get("skipped") or []
    if skipped:  # files the adapter could not use: named in the report, never dropped silently
        notes.append(f"read {source.adapter}: {format_skipped(skipped)}")
        log.warning("%s: %d file(s) skipped while reading (listed in the report's notes), e.g. %s: %s",
                    source.adapter, len(skipped), *skipped[0])
    table, encode_report = task.encode(table)
    notes.append(f"{task.name}: {encode_report}")
    if preprocess is None:
        params = PreprocessParams.build(experiment.image_size, task.modality, experiment.preprocess)
    else:
        params = PreprocessParams.from_dict(preprocess)
        if params.modality != task.modality:
            raise ValueError(f"{source.root}: task {task.name} is {task.modality}, but the recorded preprocessing is "
                             f"for {params.modality}")
    # A progress bar only on a terminal: in a cluster log it would be thousands of redrawn frames.
    table, summary = prepare_table(table, params, Path(experiment.cache_dir), workers=experiment.prepare_workers,
                                   progress=sys.stderr.isatty(), root=source.root)
    notes.append(f"prepare {source.adapter}: {summary}")
    if table.empty:
        raise ValueError(f"{source.root}: no usable image left after preparation ({summary})")
    return PreparedData(table=table.reset_index(drop=True), task=task, preprocess=params.to_dict(), notes=notes)


def make_dataset(table: pd.DataFrame, views: str, modality: str, *, train: bool, recipe: Recipe,
                 seed: int | None = None, per_image: bool = False) -> Dataset:
    """The data layer's dataset for a stage, with the recipe's augmentation for `modality`."""
    from tlese.data.loader import make_dataset as dataset_for

    return dataset_for(table, views, modality, train=train, augment=recipe.augment.get(modality) or None, seed=seed,
                       per_image=per_image)


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Integer targets of a dataset built by `make_dataset`, in item order."""
    return np.asarray(dataset.targets, dtype=np.int64)
