"""A fold file reused by a run must match its data: no extra patients, the same data hash (strict mode)."""

from __future__ import annotations

import pandas as pd
import pytest

from tlese.data.splits import load_folds, make_folds, save_folds


def _table(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "target": [i % 2 for i in range(n)]})


def test_strict_load_refuses_extra_patients_and_other_data(tmp_path):
    table = _table()
    path = save_folds(make_folds(table, k=3, seed=0), tmp_path / "folds.csv")
    assert len(load_folds(path, table, strict=True)) == 12
    fewer = table[table["patient_id"] != "P03"]
    with pytest.warns(UserWarning, match="not in the data"):
        load_folds(path, fewer)  # lenient: a warning
    with pytest.raises(ValueError, match="1 patient\\(s\\) of the fold file are not in the data"):
        load_folds(path, fewer, strict=True)
    relabelled = table.assign(target=1 - table["target"])
    with pytest.raises(ValueError, match="data hash"):
        load_folds(path, relabelled, strict=True)
