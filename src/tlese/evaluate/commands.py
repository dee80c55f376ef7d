"""CLI: ``tlese report`` recomputes the metrics of a saved predictions CSV and writes the report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``report`` command."""
    parser = subparsers.add_parser(
        "report", help="metrics, bootstrap CIs and an HTML/Markdown report from a predictions CSV",
        description="Recompute metrics (per fold, pooled, patient-level bootstrap CIs) from a saved predictions CSV "
        "and write report.md, report.html and plots/ into --out.",
    )
    parser.add_argument("--predictions", required=True, type=Path, help="predictions CSV (fold, patient_id, ..., "
                        "target, pred, prob_<class>)")
    parser.add_argument("--classes", help="comma-separated class names in task order (default: the prob_ columns)")
    parser.add_argument("--out", required=True, type=Path, help="directory for report.md, report.html, plots/")
    parser.add_argument("--title", default=None, help="report title (default: the CSV file name)")
    parser.add_argument("--history", type=Path, help="optional learning-curve CSV (epoch, [stage], [fold], losses...)")
    parser.add_argument("--config", type=Path, help="optional resolved config YAML to include")
    parser.add_argument("--n-boot", type=int, default=1000, help="patient-level bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Read the CSV, compute the tables, write the report and print where it is."""
    import pandas as pd
    import yaml

    from tlese.evaluate.metrics import HEADLINE_METRICS, METRICS, class_names_from_columns
    from tlese.evaluate.report import write_report
    from tlese.evaluate.tables import per_fold_table, summary_table
    from tlese.provenance import environment_info

    if not args.predictions.is_file():
        raise FileNotFoundError(f"{args.predictions}: predictions CSV not found (give the predictions CSV written by "
                                "merge, evaluate or predict)")
    predictions = pd.read_csv(args.predictions)
    class_names = [name.strip() for name in args.classes.split(",")] if args.classes else \
        class_names_from_columns(predictions)
    history = pd.read_csv(args.history) if args.history else None
    config = yaml.safe_load(args.config.read_text()) if args.config else {}
    summary = summary_table(predictions, class_names, n_boot=args.n_boot, seed=args.seed)
    per_fold = per_fold_table(predictions, class_names) if "fold" in predictions.columns else None
    notes = [f"bootstrap: {args.n_boot} patient-level resamples, seed {args.seed}; source {args.predictions}"]
    paths = write_report(
        args.out, title=args.title or f"Evaluation of {args.predictions.name}", summary_table=summary,
        per_fold_table=per_fold, predictions=predictions, class_names=class_names, history=history,
        config=config, environment=environment_info(), data_summary=None, comparison_table=None, notes=notes,
    )
    pooled = summary.set_index("metric")["pooled (95% CI)"]
    print(", ".join(f"{METRICS[name].label} {pooled[name]}" for name in HEADLINE_METRICS))
    print(f"report: {paths['html']} and {paths['md']}")
    return 0
