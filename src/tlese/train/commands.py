"""`tlese cv`, `merge`, `compare`, `explain` and `demo`: thin wrappers over tlese.train (cv, merge, trained)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources
from pathlib import Path


def _add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set target_recipe.epochs=3 (repeatable)")
    parser.add_argument("--arm", action="append", default=None, help="run only this arm (repeatable)")
    parser.add_argument("--fold", type=int, default=None, help="run only this fold (one job per fold on a cluster)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="run only this repeat of a repeated CV (`repeats` in the config; one job per repeat and "
                             "fold on a cluster)")
    parser.add_argument("--no-resume", action="store_true",
                        help="retrain the chosen folds even where they finished (and stage 1 when all folds run)")
    parser.add_argument("--force", action="store_true",
                        help="retrain folds and stages made from other settings or data, instead of refusing")


def _add_reference_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", action="append", default=None, metavar="ARM",
                        help="arm every other arm is tested against (repeatable; default: the config's first arm)")


DEMO_PATIENTS = 60
"""About 54 breasts with a subtype: fewer and the 5-fold CV of the demo learns little in its few epochs."""


def register(subparsers) -> None:
    cv = subparsers.add_parser("cv", help="patient-level k-fold cross-validation of the config's arms")
    _add_experiment_arguments(cv)
    cv.set_defaults(func=cmd_cv)

    compare = subparsers.add_parser("compare",
                                    help="cross-validate every arm on the same folds, then merge and compare")
    _add_experiment_arguments(compare)
    _add_reference_argument(compare)
    compare.set_defaults(func=cmd_compare)

    merge = subparsers.add_parser("merge", help="aggregate finished folds of a run into metrics and a report")
    merge.add_argument("run_dir", help="the run folder (<output_dir>/<name>)")
    _add_reference_argument(merge)
    merge.set_defaults(func=cmd_merge)

    explain = subparsers.add_parser(
        "explain", help="Grad-CAM overlays for held-out cases of one fold of a cv run",
        description="Load the fold's best checkpoint, predict its test cases and write Grad-CAM overlays for the most "
        "confident predictions per true class (right and wrong), with an index.csv.",
    )
    explain.add_argument("run_dir", type=Path, help="the run folder (<output_dir>/<name>)")
    explain.add_argument("--arm", required=True, help="arm name in the run's config")
    explain.add_argument("--fold", type=int, default=0, help="fold to explain (default 0)")
    explain.add_argument("--per-class", type=int, default=2, help="cases per true class (default 2)")
    explain.add_argument("--layer", default=None, help="module name to explain (default: the model's gradcam_layer)")
    explain.add_argument("--out", type=Path, default=None, help="folder (default <run>/<arm>/fold_<k>/gradcam)")
    explain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override the run's config, e.g. --set target.root=/new/place/of/the/data")
    explain.set_defaults(func=cmd_explain)


    _add_bundle(subparsers)

    demo = subparsers.add_parser("demo",
                                 help="the main job on the embedded synthetic data: synth, stage 1, 5-fold CV, report")
    demo.add_argument("--out", default="runs/demo", help="folder for data, runs and the report (default runs/demo)")
    demo.add_argument("--patients", type=int, default=DEMO_PATIENTS,
                      help=f"synthetic mammography patients (default {DEMO_PATIENTS}, sized for 2 CPU cores)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning prints its own INFO lines (GPU/TPU available, tips) through its handler and again through ours. It
    # sets its loggers' level when imported, so import it first, then quieten it.
    import lightning.pytorch  # noqa: F401

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def cmd_cv(args) -> int:
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_cv

    _logging()
    experiment = load_experiment(args.config, args.overrides)
    run_dir = run_cv(experiment, arms=args.arm, fold=args.fold, resume=not args.no_resume, force=args.force,
                     repeat=args.repeat)
    print(f"run folder: {run_dir}  (aggregate with: tlese merge {run_dir})")
    return 0


def cmd_merge(args) -> int:
    from tlese.train.merge import merge_run

    paths = merge_run(Path(args.run_dir), references=args.reference)
    print(f"report: {paths['html']}\nmarkdown: {paths['md']}")
    return 0


def cmd_compare(args) -> int:
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_dir_of

    experiment = load_experiment(args.config, args.overrides)
    arms = [arm.name for arm in experiment.arms]
    unknown = [name for name in args.reference or [] if name not in arms]
    if unknown:  # before hours of training, not after
        raise ValueError(f"--reference {unknown} not among the config's arms {arms}")
    cmd_cv(args)
    args.run_dir = str(run_dir_of(experiment))
    return cmd_merge(args)


def demo_config_path() -> Path:
    return Path(str(resources.files("tlese") / "configs" / "demo.yaml"))


def cmd_demo(args) -> int:
    from tlese.data.synth import SYNTH_VERSION, synthesize
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_cv
    from tlese.train.merge import merge_run

    _logging()
    started = time.time()
    out = Path(args.out).resolve()
    data_dir = out / "data"
    info_file = data_dir / "synth_info.json"
    if info_file.is_file():  # a rerun reuses the data, the prepared cache and finished folds
        made = json.loads(info_file.read_text())
        if made.get("n_patients") != args.patients or made.get("version") != SYNTH_VERSION:
            raise ValueError(f"{info_file}: the data there has {made.get('n_patients')} patients from generator "
                             f"version {made.get('version', 1)}, not {args.patients} from version {SYNTH_VERSION}; "
                             f"use another --out or delete {out}")
        paths = {"mammo_root": data_dir / "cmmd", "cxr_root": data_dir / "cxr"}
    else:
        paths = synthesize(data_dir, n_patients=args.patients, seed=0)
    overrides = [f"target.root={paths['mammo_root']}", f"cxr.root={paths['cxr_root']}", f"output_dir={out}",
                 f"cache_dir={out / 'cache'}", *args.overrides]
    experiment = load_experiment(demo_config_path(), overrides)
    run_dir = run_cv(experiment)
    report = merge_run(run_dir)
    bundle = _demo_bundle(run_dir, experiment.arms[0].name, out / "bundle")
    command = f"tlese predict {bundle} {paths['mammo_root']} --out {out / 'predictions'}"
    print(f"\ndemo finished in {time.time() - started:.0f} s\nreport: {report['html']}\nmarkdown: {report['md']}\n"
          f"bundle of {experiment.arms[0].name}: {bundle}\nrun it on the synthetic DICOMs with:\n  {command}")
    return 0


def _demo_bundle(run_dir: Path, arm: str, path: Path) -> Path:
    """The demo's bundle, made once: a rerun reuses it while it still loads (checksums and self-check pass)."""
    from tlese.bundle import BundleError, load_bundle
    from tlese.train.release import make_bundle

    if path.exists():
        try:
            load_bundle(path)
            return path
        except BundleError as error:
            raise ValueError(f"{path}: not a usable bundle ({error}); delete it to make it again") from None
    return make_bundle(run_dir, arm, path)


def cmd_explain(args: argparse.Namespace) -> int:
    import pandas as pd

    from tlese.train.trained import explain_fold

    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    out_dir = explain_fold(args.run_dir, args.arm, args.fold, per_class=args.per_class, layer=args.layer,
                           out_dir=args.out, overrides=args.overrides)
    count = len(pd.read_csv(out_dir / "index.csv"))
    print(f"{count} Grad-CAM overlay(s) in {out_dir} (index.csv lists them)")
    return 0


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
    from tlese.bundle import load_bundle
    from tlese.train.release import make_bundle

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
