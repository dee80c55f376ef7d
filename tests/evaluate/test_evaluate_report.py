import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tlese.evaluate import commands
from tlese.evaluate.metrics import classification_metrics, predictions_to_arrays
from tlese.evaluate.report import (
    environment_info,
    markdown_table,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_roc_curves,
    write_report,
)
from tlese.evaluate.tables import comparison_table, fold_warnings, per_fold_table, summary_table

CLASSES = ["Luminal A", "Luminal B", "HER2-enriched", "Triple negative"]


def _history():
    """Learning curves as training writes them: the CXR stage once (no fold), the mammography stage per fold."""
    rows = []
    for stage, folds in (("cxr", [""]), ("mammo", [0, 1])):  # "" (or NaN): a stage without folds
        for fold in folds:
            for epoch in range(4):
                rows.append({"stage": stage, "fold": fold, "epoch": epoch, "train_loss": 1 / (epoch + 1),
                             "val_loss": 1.2 / (epoch + 1) + 0.1 * (fold == 1), "val_auc": 0.6 + 0.05 * epoch,
                             "lr": 1e-3})
    return pd.DataFrame(rows)


def test_summary_and_per_fold_tables(predictions_factory):
    predictions = predictions_factory(n_patients=40)
    summary = summary_table(predictions, CLASSES, n_boot=100, seed=0).set_index("metric")
    pooled = classification_metrics(*predictions_to_arrays(predictions, CLASSES), CLASSES)
    assert summary.loc["macro_auc", "pooled"] == pytest.approx(pooled["macro_auc"])
    assert summary.loc["macro_auc", "ci_low"] < pooled["macro_auc"] < summary.loc["macro_auc", "ci_high"]
    assert summary.loc["accuracy", "n_folds"] == 5 and summary.loc["accuracy", "n_boot_used"] == 100
    assert "auc (HER2-enriched)" in summary.index
    per_fold = per_fold_table(predictions, CLASSES)
    assert list(per_fold["fold"]) == [0, 1, 2, 3, 4]
    assert summary.loc["accuracy", "mean"] == pytest.approx(per_fold["accuracy"].mean())
    accuracy = per_fold["accuracy"]
    assert summary.loc["accuracy", "mean ± std"] == f"{accuracy.mean():.3f} ± {accuracy.std():.3f}"


def test_summary_table_without_bootstrap(predictions_factory):
    summary = summary_table(predictions_factory(n_patients=20), CLASSES, n_boot=0).set_index("metric")
    assert summary.loc["macro_auc", "n_boot_used"] == 0 and np.isnan(summary.loc["macro_auc", "ci_low"])
    assert summary.loc["macro_auc", "pooled (95% CI)"] == f"{summary.loc['macro_auc', 'pooled']:.3f}"


def test_comparison_table_paired_bootstrap_and_delong(predictions_factory):
    good = predictions_factory(n_patients=40, signal=2.5)
    poor = good.copy()
    prob_columns = [f"prob_{name}" for name in CLASSES]
    poor[prob_columns] = good[prob_columns].sample(frac=1, random_state=0).to_numpy()
    table = comparison_table({"TLese": good, "ResNet-50": poor}, CLASSES, reference="ResNet-50", n_boot=200)
    assert set(table["model"]) == {"TLese"}
    macro = table.set_index("metric").loc["macro_auc"]
    assert macro["diff"] > 0.2 and macro["p_value"] < 0.01 and macro["test"] == "paired patient bootstrap"
    delong_rows = table[table["test"].str.startswith("DeLong")]
    assert len(delong_rows) == 4 and (delong_rows["p_holm"] < 0.05).all()
    per_patient = good.groupby("patient_id")[["target", "prob_Luminal A"]].mean()  # DeLong runs per patient
    expected = roc_auc_score(per_patient["target"] == 0, per_patient["prob_Luminal A"])
    assert delong_rows.iloc[0]["metric_model"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="reference"):
        comparison_table({"TLese": good}, CLASSES, reference="DenseNet-121")


def test_plots_are_written_even_for_degenerate_inputs(tmp_path):
    y = np.array([0, 0, 1, 1])  # classes 2 and 3 absent
    probs = np.full((4, 4), 0.25)
    probs[[0, 1], 0] = 0.7
    assert plot_roc_curves(y, probs, CLASSES, tmp_path / "roc.png").stat().st_size > 0
    cm = classification_metrics(y, probs, CLASSES)["confusion_matrix"]
    assert plot_confusion_matrix(cm, CLASSES, tmp_path / "cm.png").stat().st_size > 0
    assert plot_confusion_matrix(cm, CLASSES, tmp_path / "cm_counts.png", normalise=False).exists()
    assert plot_learning_curves(_history(), tmp_path / "sub" / "lc.png").exists()
    with pytest.raises(ValueError, match="epoch"):
        plot_learning_curves(pd.DataFrame({"train_loss": [1.0]}), tmp_path / "x.png")


def test_environment_info_has_versions_and_git_state():
    info = environment_info()
    for key in ("python", "numpy", "scikit-learn", "platform", "cpu", "cpu_cores", "git_commit", "date_utc"):
        assert info[key] not in (None, "")
    assert info["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert environment_info(repo_dir="/")["git_commit"] == "unknown"


def test_markdown_table_escapes_pipes_and_formats_nan():
    text = markdown_table(pd.DataFrame({"metric": ["a|b"], "value": [float("nan")]}))
    assert text.splitlines() == ["| metric | value |", "|---|---|", "| a\\|b | NaN |"]


def test_write_report_writes_markdown_html_and_plots(tmp_path, predictions_factory):
    predictions = predictions_factory(n_patients=30)
    predictions = predictions[~((predictions["fold"] == 2) & (predictions["target"] == 3))]  # degenerate fold
    warnings = fold_warnings(predictions, CLASSES)
    assert any("fold 2" in note and "Triple negative" in note for note in warnings)
    paths = write_report(
        tmp_path / "run",
        title="TLese <demo>",
        summary_table=summary_table(predictions, CLASSES, n_boot=50),
        per_fold_table=per_fold_table(predictions, CLASSES),
        predictions=predictions,
        class_names=CLASSES,
        history=_history(),
        config={"model": "tlese_resnet", "out": Path("/tmp/x"), "lr": np.float32(0.001), "stages": ("cxr", "mammo")},
        environment={"git_commit": "abc123", "seed": 0},
        data_summary=pd.DataFrame({"class": CLASSES, "patients": [8, 8, 7, 7]}),
        comparison_table=None,
        notes=["seed 0 <b>not bold</b>", warnings[0]],  # the other fold warnings are added by write_report
    )
    html, md = paths["html"].read_text(), paths["md"].read_text()
    for name in ("roc.png", "confusion_matrix.png", "learning_curves.png"):
        assert (tmp_path / "run" / "plots" / name).stat().st_size > 1000
        assert f"plots/{name}" in md
    assert html.count("data:image/png;base64,") == 3  # self-contained
    for class_name in CLASSES:
        assert class_name in html and class_name in md
    assert "TLese &lt;demo&gt;" in html and "&lt;b&gt;not bold&lt;/b&gt;" in html and "<b>not bold" not in html
    assert "model: tlese_resnet" in md and "- cxr" in md  # YAML config, tuples as lists
    assert "abc123" in html and all(md.count(note) == 1 for note in warnings)
    summary_csv = pd.read_csv(tmp_path / "run" / "tables" / "summary.csv")
    assert {"mean", "std", "pooled", "ci_low", "ci_high"} <= set(summary_csv.columns)
    assert "| metric | mean ± std | n_folds | pooled (95% CI) | n_boot_used |" in md
    assert "## Per-fold metrics" in md and "## Data summary" in md and "## Model comparison" not in md


def test_report_command(tmp_path, predictions_factory, capsys):
    csv = tmp_path / "predictions.csv"
    predictions_factory(n_patients=25).to_csv(csv, index=False)
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "--predictions", str(csv), "--out", str(tmp_path / "out"), "--n-boot", "30"])
    assert args.func(args) == 0
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "report.md").exists()
    assert "macro AUC" in capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(name in md for name in CLASSES)  # classes inferred from the prob_ columns
    args = parser.parse_args(["report", "--predictions", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        args.func(args)
    args = parser.parse_args(["report", "--predictions", str(csv), "--classes", "A,B", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="prob_A"):
        args.func(args)


def test_report_shows_the_whole_comparison_table_and_no_nan_for_no_missing_class(tmp_path, predictions_factory):
    good = predictions_factory(n_patients=24, seed=0)
    poor = predictions_factory(n_patients=24, seed=0, signal=0.2)
    comparison = comparison_table({"TLese": good, "ResNet-50": poor}, CLASSES, reference="ResNet-50", n_boot=50)
    # the data summary as merge reads it back from data_summary.csv: "" (no missing class) has become NaN
    (tmp_path / "data_summary.csv").write_text("fold,patients,missing_classes\n0,12,\n1,12,Luminal B\nall,24,\n")
    data_summary = pd.read_csv(tmp_path / "data_summary.csv")
    assert data_summary["missing_classes"].isna().sum() == 2
    paths = write_report(
        tmp_path / "run", title="compare", summary_table=summary_table(good, CLASSES, n_boot=20), per_fold_table=None,
        predictions=good, class_names=CLASSES, environment={"seed": 0}, data_summary=data_summary,
        comparison_table=comparison,
    )
    html, md = paths["html"].read_text(), paths["md"].read_text()
    comparison_html = html.split("<h2>Model comparison</h2>")[1].split("<h2>")[0]
    assert "overflow" not in comparison_html  # no scrolling box that hides columns
    assert comparison_html.count("<tr") == len(comparison) + 1  # every row (and the header)
    assert all(f"<th>{column}</th>" in comparison_html for column in comparison.columns)
    assert re.search(r"table\.table th, table\.table td \{[^}]*overflow-wrap: anywhere", html)
    assert not re.search(r"body \{[^}]*max-width", html)  # the page may be as wide as the window
    md_comparison = md.split("## Model comparison")[1].split("## ")[0]
    assert sum(line.startswith("| TLese |") for line in md_comparison.splitlines()) == len(comparison)
    data_md = md.split("## Data summary")[1].split("## ")[0]
    assert "| 0 | 12 | none |" in data_md and "| 1 | 12 | Luminal B |" in data_md and "NaN" not in data_md
    data_html = html.split("<h2>Data summary</h2>")[1].split("<h2>")[0]
    assert data_html.count("<td>none</td>") == 2 and "NaN" not in data_html
