"""ImageDataset / BreastDataset over prepared 16-bit PNGs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tlese.data.cache import write_png16
from tlese.data.loader import BreastDataset, ImageDataset


def _png(folder, name, value):
    path = folder / f"{name}.png"
    write_png16(np.full((8, 6), value, np.float32), path)
    return str(path)


@pytest.fixture
def table(tmp_path):
    rows = [
        # patient, side, view, value, target
        ("P1", "L", "MLO", 0.2, 1),
        ("P1", "L", "CC", 0.1, 1),
        ("P1", "R", "CC", 0.3, 0),
        ("P2", "L", "MLO", 0.4, 2),  # no CC
        ("P2", "L", "ML", 0.9, 2),  # not a used view
    ]
    return pd.DataFrame([
        {"patient_id": p, "side": s, "view": v, "target": t, "prepared_path": _png(tmp_path, f"{p}{s}{v}", value)}
        for p, s, v, value, t in rows
    ])


def test_image_dataset_items(table):
    dataset = ImageDataset(table.iloc[[1, 3]])  # a filtered table with a gappy index
    assert len(dataset) == 2
    image, target, index = dataset[1]
    assert image.shape == (1, 8, 6) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 0.4), atol=1e-4)
    assert (target, index) == (2, 1) and dataset.table.iloc[index]["patient_id"] == "P2"


def test_image_dataset_applies_transform_and_checks_columns(table):
    dataset = ImageDataset(table, transform=lambda image: image * 0)
    assert dataset[0][0].max() == 0
    with pytest.raises(ValueError, match=r"needs column\(s\) \['target'\]"):
        ImageDataset(table.drop(columns="target"))


def test_breast_dataset_orders_views_and_duplicates_missing(table):
    dataset = BreastDataset(table)
    breasts = dataset.breasts
    assert list(zip(breasts["patient_id"], breasts["side"])) == [("P1", "L"), ("P1", "R"), ("P2", "L")]
    images, target, index = dataset[0]
    assert images.shape == (2, 1, 8, 6) and (target, index) == (1, 0)
    assert images[0].mean().item() == pytest.approx(0.1, abs=1e-4)  # CC first
    assert images[1].mean().item() == pytest.approx(0.2, abs=1e-4)  # then MLO
    assert list(breasts["duplicated_view"]) == ["", "MLO", "CC"]
    right, _, _ = dataset[1]
    assert torch.equal(right[0], right[1])  # the CC used for both slots


def test_breast_dataset_drop_policy_warns(table):
    with pytest.warns(UserWarning, match="dropped 2 breast"):
        dataset = BreastDataset(table, single_view_policy="drop")
    assert len(dataset) == 1 and dataset.breasts.iloc[0]["side"] == "L"


def test_breast_dataset_rejects_conflicting_targets(table):
    table.loc[0, "target"] = 0
    with pytest.raises(ValueError, match=r"breast P1 L: conflicting targets \[0, 1\]"):
        BreastDataset(table)


def test_breast_dataset_rejects_bad_policy(table):
    with pytest.raises(ValueError, match="single_view_policy"):
        BreastDataset(table, single_view_policy="guess")


def test_works_with_a_dataloader(table):
    loader = torch.utils.data.DataLoader(BreastDataset(table), batch_size=2)
    images, targets, indices = next(iter(loader))
    assert images.shape == (2, 2, 1, 8, 6) and targets.tolist() == [1, 0] and indices.tolist() == [0, 1]
