"""From a config's data source to torch datasets: adapter -> task labels -> prepared (cached) images -> datasets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
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

    def internal_split(self, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Patient-level train/validation split of the whole table (used by stage 1, which has no test fold)."""
        from tlese.data.splits import make_folds

        k = max(2, int(round(1.0 / val_fraction)))
        folds = make_folds(self.table, k=k, seed=seed)
        val_patients = set(folds.loc[folds["fold"] == 0, "patient_id"])
        is_val = self.table["patient_id"].isin(val_patients)
        return self.table[~is_val].reset_index(drop=True), self.table[is_val].reset_index(drop=True)


def prepare(source: DataSource, experiment: Experiment) -> PreparedData:
    """Read the source with its adapter, encode the task's labels, prepare every image once (cached)."""
    from tlese.data.cache import prepare_table
    from tlese.data.datasets import get_adapter
    from tlese.data.preprocess import PreprocessParams
    from tlese.data.tasks import get_task

    task = get_task(source.task)
    table = get_adapter(source.adapter)(source.root, **source.options)
    table, encode_report = task.encode(table)
    notes = [f"{source.task}: {encode_report}"]
    params = PreprocessParams(size=experiment.image_size, modality=task.modality)
    table, summary = prepare_table(table, params, Path(experiment.cache_dir), workers=experiment.prepare_workers)
    notes.append(f"prepare {source.adapter}: {summary}")
    if table.empty:
        raise ValueError(f"{source.root}: no usable image left after preparation ({summary})")
    return PreparedData(table=table.reset_index(drop=True), task=task, preprocess=params.to_dict(), notes=notes)


class DuplicatedView(Dataset):
    """One image shown to a dual-view model in both view slots (per-image predictions of a dual-view model)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        image, target, *rest = self.images[index]
        return (torch.stack([image, image]), target, *rest)


def make_dataset(table: pd.DataFrame, views: str, modality: str, *, train: bool, recipe: Recipe,
                 seed: int | None = None, per_image: bool = False) -> Dataset:
    """Single-view: one item per image. Dual-view: one item per breast (CC, MLO), or per image duplicated."""
    from tlese.data.loader import BreastDataset, ImageDataset
    from tlese.data.transforms import build_transforms

    transform = build_transforms(modality, train=train, cfg=recipe.augment.get(modality) or None, seed=seed)
    if views == "single":
        return ImageDataset(table, transform=transform)
    if per_image:
        return DuplicatedView(ImageDataset(table, transform=transform))
    return BreastDataset(table, transform=transform)


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Integer targets of a dataset built by `make_dataset`, in item order."""
    if isinstance(dataset, DuplicatedView):
        dataset = dataset.images
    for attribute in ("targets",):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    frame = getattr(dataset, "breasts", None)
    if frame is None:
        frame = dataset.table
    return frame["target"].to_numpy(dtype=np.int64)
