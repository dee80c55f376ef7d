"""`tlese bundle` and `tlese predict`: thin wrappers over tlese.serve (one `_add_<command>` per command)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from tlese.serve.evaluate import register_evaluate
    from tlese.serve.predict import register_predict

    _add_bundle(subparsers)
    register_predict(subparsers)
    register_evaluate(subparsers)


def _add_bundle(subparsers) -> None:
    bundle = subparsers.add_parser(
        "bundle", help="freeze a finished run's arm into one portable, self-checking bundle (offline, CPU)",
        description="Write the arm's finished fold models (an ensemble) as safetensors, with model.json (model, "
        "classes, task, preprocessing), a model card (CV metrics with patient-bootstrap CIs, transfer chain, "
        "calibration, provenance), a temperature fitted on the out-of-fold predictions, reference inputs with their "
        "expected outputs and sha256 checksums of every file. The bundle is loaded back and verified before it is "
        "moved into place.",
    )
    bundle.add_argument("run_dir", type=Path, help="the run folder (<output_dir>/<name>)")
    bundle.add_argument("--arm", required=True, help="arm name in the run's config")
    bundle.add_argument("--out", type=Path, required=True, help="bundle folder to write (must not exist)")
    bundle.add_argument("--zip", action="store_true", help="write OUT.zip instead of a folder")
    bundle.add_argument("--intended-use", default=None, metavar="TEXT",
                        help='intended-use statement of the card (default "research use only; not for diagnostic '
                             'use")')
    bundle.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="patient-bootstrap resamples for the card's CIs (default: the run's `bootstrap`)")
    bundle.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    from tlese.serve.bundle import load_bundle, make_bundle

    path = make_bundle(args.run_dir, args.arm, args.out, zip=args.zip, intended_use=args.intended_use,
                       n_boot=args.bootstrap)
    bundle = load_bundle(path)
    calibration = bundle.card["calibration"]
    print(f"bundle: {path}")
    print(f"  sha256 {bundle.sha256}; {bundle.meta['model']['registry_name']} x {len(bundle.models)} fold models "
          f"(folds {bundle.folds}); input {bundle.input_shape}; classes {bundle.class_names}")
    print(f"  temperature {bundle.temperature:.4g}: ECE {calibration['ece_before']:.4f} -> "
          f"{calibration['ece_after']:.4f} on {calibration['n']} out-of-fold predictions")
    if bundle.card.get("folds_missing"):
        print(f"  folds not finished, not in the bundle: {bundle.card['folds_missing']}")
    print(f"  intended use: {bundle.intended_use}")
    return 0
