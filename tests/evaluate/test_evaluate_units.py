"""Matching two models' predictions unit by unit (image or breast), and the metric registry behind the tables."""

import io

import numpy as np
import pandas as pd
import pytest

from tlese.evaluate.metrics import (
    HEADLINE_METRICS,
    METRICS,
    PRIMARY_METRIC,
    SCALAR_METRICS,
    UNIT_KEY,
    unit_key_columns,
)
from tlese.evaluate.stats import align_pair, paired_bootstrap_test
from tlese.evaluate.tables import (
    comparison_table,
    fold_warnings,
    overview_row,
    per_fold_table,
    summary_table,
)

CXR_CLASSES = ["COVID", "No_findings", "Pneumonia"]


def make_cxr_predictions(n_patients=3, images_per_patient=6, signal=2.0, seed=0, image_id=True) -> pd.DataFrame:
    """DarkCovidNet-like: several images per patient, labels per image, ``side`` and ``view`` empty."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        for image in range(images_per_patient):
            label = (patient + image) % len(CXR_CLASSES)
            logits = rng.normal(size=len(CXR_CLASSES))
            logits[label] += signal
            probs = np.exp(logits) / np.exp(logits).sum()
            row = {"fold": patient % 2, "patient_id": f"P{patient}", "side": "", "view": "", "target": label,
                   "pred": int(probs.argmax()), **{f"prob_{name}": p for name, p in zip(CXR_CLASSES, probs)}}
            if image_id:
                row["image_id"] = f"images/{CXR_CLASSES[label]}/P{patient}_{image}.png"
            rows.append(row)
    return pd.DataFrame(rows)


def _shuffled_scores(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The same units scored by a weaker model, rows in another order."""
    other = frame.copy()
    columns = [column for column in frame.columns if column.startswith("prob_")]
    other[columns] = frame[columns].sample(frac=1, random_state=seed).to_numpy()
    other["pred"] = other[columns].to_numpy().argmax(1)
    return other.sample(frac=1, random_state=seed + 1)


def _accuracy(frame: pd.DataFrame) -> float:
    return float((frame["target"] == frame["pred"]).mean())


def _csv_round_trip(frame: pd.DataFrame) -> pd.DataFrame:
    """As train writes and merge reads it: empty strings come back as NaN."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False)), dtype={"patient_id": str})


def test_unit_key_uses_the_columns_present_and_non_empty_in_both():
    cxr = make_cxr_predictions()
    assert unit_key_columns(cxr) == ["patient_id", "image_id"]  # side and view are empty
    assert unit_key_columns(cxr, cxr.drop(columns="image_id")) == ["patient_id"]
    breasts = pd.DataFrame({"patient_id": ["P0", "P0"], "side": ["L", "R"], "view": "breast", "image_id": np.nan})
    assert unit_key_columns(breasts) == ["patient_id", "side", "view"]
    assert list(UNIT_KEY) == ["patient_id", "side", "view", "image_id"]
    with pytest.raises(ValueError, match="patient_id"):
        unit_key_columns(cxr.drop(columns="patient_id"))


def test_cxr_comparison_with_many_images_per_patient_and_empty_side_view():
    model = make_cxr_predictions(signal=3.0)
    reference = _csv_round_trip(_shuffled_scores(model, seed=0))  # side/view NaN here, "" in the other table
    result = paired_bootstrap_test(model, reference, _accuracy, n_boot=50)
    assert result["n_units"] == 18 and result["n_patients"] == 3 and result["n_dropped"] == 0
    assert result["unit_key"] == ["patient_id", "image_id"]
    assert result["metric_a"] == pytest.approx(_accuracy(model))
    assert result["metric_b"] == pytest.approx(_accuracy(reference))

    table = comparison_table({"TLese": model, "DenseNet": reference}, CXR_CLASSES, reference="DenseNet", n_boot=50)
    bootstrap = table[table["test"] == "paired patient bootstrap"]
    assert list(bootstrap["metric"]) == [PRIMARY_METRIC, *[m for m in HEADLINE_METRICS if m != PRIMARY_METRIC]]
    assert (bootstrap["n_units"] == 18).all() and (table["n_dropped"] == 0).all()
    assert bootstrap.set_index("metric").loc["accuracy", "diff"] == pytest.approx(result["diff"])
    delong = table[table["test"].str.startswith("DeLong")]
    assert len(delong) == 3
    # DeLong runs on one case per (patient, target): 3 patients x 3 labels each.
    assert (delong["n_units"] == 9).all()


def test_cxr_predictions_without_image_id_name_the_missing_column():
    model = make_cxr_predictions(image_id=False)
    with pytest.raises(ValueError, match=r"model A: 18 of 18 rows share their unit key \['patient_id'\].*"
                                         r"e\.g\. 6 rows with patient_id='P0'.*'image_id' column"):
        paired_bootstrap_test(model, model.copy(), _accuracy, n_boot=10)
    with pytest.raises(ValueError, match="image_id"):
        comparison_table({"a": model, "b": model.copy()}, CXR_CLASSES, reference="b", n_boot=10)
    # An image_id in only one table does not help: the key is what both have.
    with pytest.raises(ValueError, match="rows share their unit key"):
        paired_bootstrap_test(make_cxr_predictions(), model, _accuracy, n_boot=10)


def test_duplicated_image_id_is_a_clear_error():
    model = make_cxr_predictions()
    doubled = pd.concat([model, model.iloc[:2]], ignore_index=True)
    with pytest.raises(ValueError, match=r"model B: 4 of 20 rows .*\['patient_id', 'image_id'\].*e\.g\. 2 rows"):
        paired_bootstrap_test(model, doubled, _accuracy, n_boot=10)


def test_breast_level_predictions_still_match_on_patient_side_view(predictions_factory):
    images = predictions_factory(n_patients=30, signal=2.5)
    probs = [column for column in images.columns if column.startswith("prob_")]
    breasts = images.groupby(["fold", "patient_id", "side"], as_index=False).agg(
        {"target": "first", **{column: "mean" for column in probs}}).assign(view="breast")
    breasts["pred"] = breasts[probs].to_numpy().argmax(1)
    reference = _csv_round_trip(_shuffled_scores(breasts, seed=3).assign(image_id=""))  # empty image_id: ignored
    pair = align_pair(breasts, reference)
    assert pair.key == ("patient_id", "side", "view") and pair.n_units == len(breasts)
    classes = [column.removeprefix("prob_") for column in probs]
    table = comparison_table({"TLese": breasts, "ResNet": reference}, classes, reference="ResNet", n_boot=50)
    assert (table["n_units"].iloc[:3] == len(breasts)).all()
    assert table.set_index("metric").loc["macro_auc", "diff"] > 0


def test_different_subsets_report_matched_and_dropped_units():
    model = make_cxr_predictions(n_patients=4)
    reference = _shuffled_scores(model, seed=0)
    reference = reference[reference["patient_id"] != "P3"]  # e.g. an arm with a fold still running
    with pytest.raises(ValueError, match=r"18 units matched .* 6 only in A \(e\.g\. \(P3, images/COVID/P3_0\.png\)"
                                         r".*\), 0 only in B;.*"
                                         r"drop_unmatched=True"):
        paired_bootstrap_test(model, reference, _accuracy, n_boot=10)
    with pytest.warns(UserWarning, match="restricted to the common units: 18 units matched"):
        result = paired_bootstrap_test(model, reference, _accuracy, n_boot=10, drop_unmatched=True)
    assert result["n_units"] == 18 and result["n_dropped"] == 6 and result["n_patients"] == 3
    with pytest.warns(UserWarning, match="6 only in A"):
        table = comparison_table({"a": model, "b": reference}, CXR_CLASSES, reference="b", n_boot=10,
                                 drop_unmatched=True)
    assert (table["n_dropped"] == 6).all()
    with pytest.warns(UserWarning, match=r"0 only in B$"):
        pair = align_pair(model, reference, drop_unmatched=True)
    assert pair.describe() == "18 units matched on ['patient_id', 'image_id'] (6 only in A and 0 only in B dropped)"
    with pytest.raises(ValueError, match="0 units matched"):  # nothing in common: never silently empty
        align_pair(model[model["patient_id"] == "P0"], reference[reference["patient_id"] == "P1"],
                   drop_unmatched=True)


def test_per_image_tables_do_not_assume_one_row_per_patient_side_view():
    predictions = make_cxr_predictions(n_patients=6, images_per_patient=5)
    summary = summary_table(predictions, CXR_CLASSES, n_boot=30).set_index("metric")
    assert summary.loc["accuracy", "pooled"] == pytest.approx(_accuracy(predictions))
    assert summary.loc["accuracy", "n_folds"] == 2 and summary.loc["accuracy", "n_boot_used"] == 30
    per_fold = per_fold_table(predictions, CXR_CLASSES)
    assert list(per_fold["n"]) == [15, 15]
    assert fold_warnings(predictions, CXR_CLASSES) == []


def test_tables_follow_the_metric_registry(predictions_factory):
    predictions = predictions_factory(n_patients=20)
    classes = [column.removeprefix("prob_") for column in predictions.columns if column.startswith("prob_")]
    summary = summary_table(predictions, classes, n_boot=20)
    assert list(summary["metric"].iloc[:len(SCALAR_METRICS)]) == list(METRICS)
    row = overview_row(summary)
    # The comparison-overview columns a run writes today, now derived from METRICS.
    assert list(row) == ["accuracy (mean ± std)", "balanced accuracy (mean ± std)", "macro AUC (mean ± std)",
                         "pooled macro AUC (95% CI)"]
    indexed = summary.set_index("metric")
    assert row["macro AUC (mean ± std)"] == indexed.loc["macro_auc", "mean ± std"]
    assert row["pooled macro AUC (95% CI)"] == indexed.loc["macro_auc", "pooled (95% CI)"]
    with pytest.raises(ValueError, match="not a summary_table"):
        overview_row(summary.drop(columns="mean ± std"))
    with pytest.raises(ValueError, match="unknown metrics"):
        comparison_table({"a": predictions, "b": predictions}, classes, reference="b", metrics=["kappa"])
