"""Evaluation: metrics per fold, patient-level bootstrap and paired tests (DeLong), and the run report.

- `metrics`: `classification_metrics`, `summarise_folds`, `predictions_to_arrays`, `fold_metrics`.
- `stats`: `bootstrap_ci`, `delong_roc_variance`, `delong_test`, `delong_per_class`, `paired_bootstrap_test`.
- `tables`: `per_fold_table`, `summary_table` (the numbers a paper quotes, as DataFrames).
- `report`: `write_report`, `environment_info`, `plot_roc_curves`, `plot_confusion_matrix`, `plot_learning_curves`.
"""
