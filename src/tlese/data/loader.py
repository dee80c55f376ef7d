"""Torch datasets over prepared 16-bit PNGs (see tlese.data.cache): one image per item, or one breast (CC + MLO).

Items are float tensors in [0, 1]; models normalise internally. The third element of every item is the position of
the image / breast in `dataset.table` / `dataset.breasts`, so predictions can be matched back to their rows.
"""

from __future__ import annotations

import warnings

import pandas as pd
import torch
from torch.utils.data import Dataset

from tlese.data.cache import read_png16
from tlese.vocab import DUAL_VIEW_ORDER, SINGLE_VIEW_POLICIES


def _require(table: pd.DataFrame, columns: set[str], what: str) -> None:
    missing = columns - set(table.columns)
    if missing:
        raise ValueError(f"{what} needs column(s) {sorted(missing)}; table has {list(table.columns)}")


def split_key(key) -> tuple[int, int | None]:
    """An item key is a position, or (position, augmentation seed) from the training sampler."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


def _load(path: str) -> torch.Tensor:
    return torch.from_numpy(read_png16(path))[None]  # (1, H, W)


class ImageDataset(Dataset):
    """One prepared image per item -> (tensor (1, H, W), target int, position in `self.table`)."""

    def __init__(self, table: pd.DataFrame, transform=None):
        _require(table, {"prepared_path", "target"}, "ImageDataset")
        self.table = table.reset_index(drop=True)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    @property
    def targets(self) -> list[int]:
        return [int(target) for target in self.table["target"]]

    def __getitem__(self, key):
        index, seed = split_key(key)
        row = self.table.iloc[index]
        image = _load(row["prepared_path"])
        if self.transform is not None:
            image = self.transform(image) if seed is None else self.transform(image, seed=seed)
        return image, int(row["target"]), index


class BreastDataset(Dataset):
    """One breast (patient_id, side) per item -> (tensor (2, 1, H, W) in DUAL_VIEW_ORDER, target, position).

    `self.breasts` has one row per breast: patient_id, side, target, one path column per view (`path_CC`,
    `path_MLO`), `duplicated_view` (the view that was filled in from the other one, else "") and `n_images`.
    A breast with a missing view is kept with the other view in both slots (policy "duplicate") or removed
    (policy "drop", with a warning giving the count). Several images of one view: the first by path is used
    (warned). Conflicting targets within a breast raise ValueError naming the breast.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        transform=None,
        views: tuple[str, ...] = tuple(view.value for view in DUAL_VIEW_ORDER),
        single_view_policy: str = "duplicate",
    ):
        _require(table, {"prepared_path", "target", "patient_id", "side", "view"}, "BreastDataset")
        if single_view_policy not in SINGLE_VIEW_POLICIES:
            raise ValueError(f"single_view_policy must be one of {SINGLE_VIEW_POLICIES}, got {single_view_policy!r}")
        self.views = tuple(str(getattr(view, "value", view)) for view in views)
        self.transform = transform
        self.single_view_policy = single_view_policy
        self.breasts = self._group(table)

    def _group(self, table: pd.DataFrame) -> pd.DataFrame:
        table = table.assign(view=table["view"].map(lambda v: str(getattr(v, "value", v)).upper()))
        table = table[table["view"].isin(self.views)].sort_values("prepared_path")
        rows, dropped, extra = [], 0, 0
        for (patient_id, side), group in table.groupby(["patient_id", "side"], sort=True):
            targets = sorted(set(int(t) for t in group["target"]))
            if len(targets) > 1:
                raise ValueError(f"breast {patient_id} {side}: conflicting targets {targets} across its images")
            paths = {}
            for view in self.views:
                candidates = group.loc[group["view"] == view, "prepared_path"].tolist()
                extra += max(0, len(candidates) - 1)
                paths[view] = candidates[0] if candidates else None
            present = [view for view in self.views if paths[view] is not None]
            duplicated = ""
            if len(present) < len(self.views):
                if self.single_view_policy == "drop":
                    dropped += 1
                    continue
                duplicated = ",".join(view for view in self.views if paths[view] is None)
                for view in self.views:
                    paths[view] = paths[view] or paths[present[0]]
            rows.append({"patient_id": patient_id, "side": side, "target": targets[0],
                         **{f"path_{view}": paths[view] for view in self.views},
                         "duplicated_view": duplicated, "n_images": len(group)})
        if dropped:
            warnings.warn(f"BreastDataset: dropped {dropped} breast(s) missing one of the views {self.views}",
                          stacklevel=3)
        if extra:
            warnings.warn(f"BreastDataset: {extra} extra image(s) of an already present view ignored "
                          "(first by path used)", stacklevel=3)
        columns = ["patient_id", "side", "target", *[f"path_{v}" for v in self.views], "duplicated_view", "n_images"]
        return pd.DataFrame(rows, columns=columns)

    def __len__(self) -> int:
        return len(self.breasts)

    @property
    def targets(self) -> list[int]:
        return [int(target) for target in self.breasts["target"]]

    def __getitem__(self, key):
        index, seed = split_key(key)
        row = self.breasts.iloc[index]
        images = torch.stack([_load(row[f"path_{view}"]) for view in self.views])  # (V, 1, H, W)
        if self.transform is not None:
            images = self.transform(images) if seed is None else self.transform(images, seed=seed)
        return images, int(row["target"]), index


class DuplicatedView(Dataset):
    """One image shown to a dual-view model in both view slots (per-image predictions of a dual-view model)."""

    def __init__(self, images: ImageDataset):
        self.images = images

    @property
    def table(self) -> pd.DataFrame:
        return self.images.table

    @property
    def targets(self) -> list[int]:
        return self.images.targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        image, target, *rest = self.images[key]
        return (torch.stack([image, image]), target, *rest)


def make_dataset(table: pd.DataFrame, views: str, modality: str, *, train: bool, augment: dict | None = None,
                 seed: int | None = None, per_image: bool = False) -> Dataset:
    """The one way from a prepared table to a torch dataset.

    views "single": one item per image; "dual": one item per breast (CC, MLO), or with `per_image` each image
    duplicated into both slots. `train` turns augmentation on (magnitudes from `augment`, see build_transforms).
    """
    from tlese.data.transforms import build_transforms

    if views not in ("single", "dual"):
        raise ValueError(f"views must be 'single' or 'dual', got {views!r}")
    transform = build_transforms(modality, train=train, cfg=augment or None, seed=seed)
    if views == "single":
        return ImageDataset(table, transform=transform)
    if per_image:
        return DuplicatedView(ImageDataset(table, transform=transform))
    return BreastDataset(table, transform=transform)
