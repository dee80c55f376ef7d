"""Synthetic predictions tables in the train -> evaluate CSV format (docs/architecture.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

SUBTYPES = ("Luminal A", "Luminal B", "HER2-enriched", "Triple negative")


def make_predictions(n_patients=60, class_names=SUBTYPES, signal=1.5, seed=0, n_folds=5) -> pd.DataFrame:
    """Up to 4 images per patient (sides x CC/MLO) sharing the patient's label; logits = noise + signal on the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        label = patient % len(class_names)  # balanced, so every fold holds every class
        for side in ("L", "R")[: rng.integers(1, 3)]:
            for view in ("CC", "MLO"):
                logits = rng.normal(size=len(class_names))
                logits[label] += signal
                probs = np.exp(logits) / np.exp(logits).sum()
                rows.append({"fold": patient % n_folds, "patient_id": f"P{patient:03d}", "side": side, "view": view,
                             "target": label, "pred": int(probs.argmax()),
                             **{f"prob_{name}": p for name, p in zip(class_names, probs)}})
    return pd.DataFrame(rows)


@pytest.fixture
def predictions_factory():
    return make_predictions
