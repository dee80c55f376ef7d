import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from tlese.evaluate.metrics import (
    binary_auc,
    class_names_from_columns,
    classification_metrics,
    fold_metrics,
    predictions_to_arrays,
    summarise_folds,
)

ABC = ["A", "B", "C"]
# Six cases, three classes; the prediction is the argmax of each row.
Y_TOY = np.array([0, 0, 0, 1, 1, 2])
P_TOY = np.array([
    [0.8, 0.1, 0.1],  # A -> A
    [0.6, 0.3, 0.1],  # A -> A
    [0.3, 0.6, 0.1],  # A -> B
    [0.2, 0.7, 0.1],  # B -> B
    [0.5, 0.2, 0.3],  # B -> A
    [0.1, 0.2, 0.7],  # C -> C
])


def test_toy_3x3_by_hand():
    result = classification_metrics(Y_TOY, P_TOY, ABC)
    assert result["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert result["n"] == 6
    assert result["accuracy"] == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1/1
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    a, b, c = (result["per_class"][name] for name in ABC)
    # A: positives .8 .6 .3 vs negatives .2 .5 .1 -> 3 + 3 + 2 of 9 pairs ranked right
    assert a["auc"] == pytest.approx(8 / 9)
    # B: positives .7 .2 vs negatives .1 .3 .6 .2 -> 4 + (1 + a tie 0.5) of 8 pairs
    assert b["auc"] == pytest.approx(5.5 / 8)
    assert c["auc"] == pytest.approx(1.0)
    assert result["macro_auc"] == pytest.approx((8 / 9 + 5.5 / 8 + 1) / 3)
    # A: TP 2, FP 1 (case 5), FN 1 -> F1 = 4/6; specificity 2 of 3 negatives
    assert (a["sensitivity"], a["specificity"], a["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # B: TP 1, FP 1 (case 3), FN 1 -> F1 = 2/4; specificity 3 of 4
    assert (b["sensitivity"], b["specificity"], b["f1"]) == pytest.approx((1 / 2, 3 / 4, 1 / 2))
    assert (c["sensitivity"], c["specificity"], c["f1"]) == pytest.approx((1, 1, 1))
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert [v["support"] for v in result["per_class"].values()] == [3, 2, 1]
    assert result["warnings"] == []


@pytest.mark.parametrize("num_classes", [2, 4])
def test_agrees_with_sklearn_on_random_data_with_ties(num_classes):
    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, 300)
    logits = rng.normal(size=(300, num_classes)) + 1.2 * np.eye(num_classes)[y]
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounding creates ties
    probs[:, -1] = 1 - probs[:, :-1].sum(1)
    names = [f"c{k}" for k in range(num_classes)]
    result = classification_metrics(y, probs, names)
    y_pred = probs.argmax(1)
    assert result["accuracy"] == pytest.approx(accuracy_score(y, y_pred))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, y_pred))
    np.testing.assert_array_equal(result["confusion_matrix"], confusion_matrix(y, y_pred, labels=range(num_classes)))
    f1 = f1_score(y, y_pred, labels=range(num_classes), average=None)
    np.testing.assert_allclose([result["per_class"][n]["f1"] for n in names], f1)
    for k, name in enumerate(names):
        assert result["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    if num_classes == 2:
        assert result["auc"] == result["macro_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    else:
        expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
        assert result["macro_auc"] == pytest.approx(expected)


def test_binary_auc_nan_for_one_class():
    assert math.isnan(binary_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    labels, scores = [0, 1, 0, 1], [0.1, 0.9, 0.5, 0.5]
    assert binary_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_fold_with_missing_class_gives_nan_and_warning():
    keep = Y_TOY != 2
    result = classification_metrics(Y_TOY[keep], P_TOY[keep], ABC)
    c = result["per_class"]["C"]
    assert math.isnan(c["auc"]) and math.isnan(c["sensitivity"]) and c["support"] == 0
    assert c["specificity"] == pytest.approx(1.0)  # never predicted, so all 5 negatives are right
    assert result["confusion_matrix"][2] == [0, 0, 0]  # the absent class keeps its row
    assert any("'C'" in note and "absent" in note for note in result["warnings"])
    # macro AUC averages the two classes that have positives and negatives
    expected = np.mean([roc_auc_score(Y_TOY[keep] == k, P_TOY[keep][:, k]) for k in (0, 1)])
    assert result["macro_auc"] == pytest.approx(expected)
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_single_class_fold_does_not_crash():
    result = classification_metrics([1, 1, 1], P_TOY[3:6], ABC)
    assert math.isnan(result["macro_auc"])
    assert all(math.isnan(v["auc"]) for v in result["per_class"].values())
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert any("only class 'B'" in note for note in result["warnings"])
    binary = classification_metrics([0, 0], [[0.9, 0.1], [0.4, 0.6]], ["neg", "pos"])
    assert math.isnan(binary["auc"]) and binary["warnings"]


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(Y_TOY, P_TOY[:, :2], ABC)
    with pytest.raises(ValueError, match="targets"):
        classification_metrics([0, 3], P_TOY[:2], ABC)


def test_summarise_folds_skips_nan_folds_and_counts_them():
    folds = [
        classification_metrics(Y_TOY, P_TOY, ABC),
        classification_metrics(Y_TOY[Y_TOY != 2], P_TOY[Y_TOY != 2], ABC),  # C absent
        {"accuracy": 0.2, "macro_auc": float("nan")},  # flat dicts are accepted too
    ]
    summary = summarise_folds(folds)
    accuracies = [4 / 6, 3 / 5, 0.2]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert summary["accuracy"]["n_folds"] == 3
    assert summary["auc (C)"]["n_folds"] == 1 and math.isnan(summary["auc (C)"]["std"])
    assert summary["macro_auc"]["n_folds"] == 2
    assert "n" not in summary and "per_class" not in summary


def test_predictions_to_arrays_follows_class_order_not_column_order():
    df = pd.DataFrame({"target": [0, 1], "prob_B": [0.3, 0.8], "prob_A": [0.7, 0.2]})
    y, probs = predictions_to_arrays(df, ["A", "B"])
    np.testing.assert_array_equal(y, [0, 1])
    np.testing.assert_allclose(probs, [[0.7, 0.3], [0.2, 0.8]])
    assert class_names_from_columns(df) == ["B", "A"]
    with pytest.raises(ValueError, match="prob_C"):
        predictions_to_arrays(df, ["A", "C"])


def test_fold_metrics_prefixes_warnings_with_the_fold(predictions_factory):
    df = predictions_factory(n_patients=40)
    df = df[~((df["fold"] == 3) & (df["target"] == 2))]  # drop a class from fold 3
    folds = fold_metrics(df, ["Luminal A", "Luminal B", "HER2-enriched", "Triple negative"])
    assert [fold["fold"] for fold in folds] == [0, 1, 2, 3, 4]
    assert folds[3]["warnings"] and all(note.startswith("fold 3:") for note in folds[3]["warnings"])
    assert not folds[0]["warnings"]
