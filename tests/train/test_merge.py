"""Merging helpers that need no training run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tlese.train.merge import _holm_over_pairs


def test_holm_over_pairs_adjusts_each_bootstrap_metric_over_all_pairs():
    table = pd.DataFrame({
        "model": ["b", "c", "d", "b", "c", "d", "b"],
        "reference": ["a"] * 7,
        "metric": ["macro_auc"] * 3 + ["accuracy"] * 3 + ["auc (x)"],
        "test": ["paired patient bootstrap"] * 6 + ["DeLong one-vs-rest, per patient"],
        "p_value": [0.01, 0.04, 0.30, 0.02, 0.02, 0.50, 0.01],
    })
    adjusted = _holm_over_pairs(table)["p_holm_pairs"].to_numpy()
    # Holm over three pairs: sorted p times (3, 2, 1), kept monotone
    assert adjusted[:3] == pytest.approx([0.03, 0.08, 0.30])
    assert adjusted[3:6] == pytest.approx([0.06, 0.06, 0.50])
    assert np.isnan(adjusted[6])  # DeLong rows keep their own per-class adjustment (p_holm)
