"""`tlese predict` and `tlese evaluate`: thin wrappers over the prediction library (tlese.predict)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    register_predict(subparsers)
    register_evaluate(subparsers)


def register_predict(subparsers) -> None:
    """Add the ``predict`` command."""
    parser = subparsers.add_parser(
        "predict", help="per-breast predictions of a model bundle on DICOM / zip / folders / a manifest CSV",
        description="Group the inputs into breasts by their DICOM tags (or a manifest CSV for PNG/JPEG), prepare "
        "every image as in training, and write one verdict (ok / degraded / refused, with reasons) and the class "
        "probabilities per breast into --out: breasts/*.json (kept across reruns), predictions.csv, "
        "predictions.json, refused_inputs.csv. Outputs are keyed by a salted pseudonymous exam key.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.bundle.format)")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="DICOM file, folder (recursive), zip archive, or manifest CSV (patient, side, view, path)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--heatmaps", action="store_true",
                        help="Grad-CAM overlays of the predicted class per view, on the original image")
    parser.add_argument("--sr", action="store_true", help="one DICOM SR per study")
    parser.add_argument("--link-file", type=Path, default=None,
                        help="also write this CSV from exam key to StudyInstanceUID / AccessionNumber (identifying)")
    parser.add_argument("--salt", default=None, help="secret for the exam keys (default: generated once into "
                        "OUT/.salt)")
    parser.add_argument("--runtime", default="torch",
                        help="inference runtime: torch (default) or onnx (predict checks the name)")
    parser.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """Load the bundle, predict, print the summary (counts, reasons and exam keys only)."""
    from tlese.bundle.format import load_bundle
    from tlese.predict.pipeline import predict

    summary = predict(load_bundle(args.bundle), args.inputs, args.out, salt=args.salt, link_file=args.link_file,
                      heatmaps=args.heatmaps, sr=args.sr, runtime=args.runtime)
    print("\n".join(summary.lines()))
    return 0


def register_evaluate(subparsers) -> None:
    """Add the ``evaluate`` command."""
    parser = subparsers.add_parser(
        "evaluate", help="external evaluation of a model bundle on a labelled data set (before use at a site)",
        description="Read the labelled set with the dataset adapter, encode its labels with the task (its classes "
        "must be the bundle's), predict every breast exactly as `tlese predict` does, and write the same report as "
        "`merge` into --out: metrics with patient-bootstrap CIs, per-class AUC / sensitivity / specificity, ROC, "
        "confusion matrix, reliability diagrams; calibrated and raw probabilities in predictions.csv.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.bundle.format)")
    parser.add_argument("--dataset", required=True, help="dataset adapter name (e.g. cmmd)")
    parser.add_argument("--root", required=True, type=Path, help="the labelled data set's folder")
    parser.add_argument("--task", required=True, help="registered task name (its classes must be the bundle's)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="patient-level bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from tlese.predict.validate import TRAINING_OVERLAP_WARNING, evaluate_bundle

    paths = evaluate_bundle(args.bundle, args.dataset, args.root, args.task, args.out, n_boot=args.bootstrap,
                            seed=args.seed)
    evaluation = json.loads(paths["evaluation_json"].read_text())
    print(f"external evaluation of bundle {evaluation['bundle_sha256']} on {evaluation['dataset']}: "
          f"{evaluation['evaluated_breasts']} of {evaluation['labelled_breasts']} breasts evaluated "
          f"({evaluation['degraded']} degraded, {evaluation['refused']} refused); macro AUC "
          f"{evaluation['macro_auc']:.4f} (raw {evaluation['raw_macro_auc']:.4f})")
    print(f"WARNING: {TRAINING_OVERLAP_WARNING}")
    print(f"report: {paths['html']} and {paths['md']}")
    return 0
