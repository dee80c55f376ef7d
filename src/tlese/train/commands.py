"""`tlese cv`, `merge`, `compare`, `explain`, `bundle` and `demo`: thin wrappers over tlese.train (cv, merge, trained,
release)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
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


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning prints its own INFO lines (GPU/TPU available, tips) through its handler and again through ours. It
    # sets its loggers' level when imported, so import it first, then quieten it.
    import lightning.pytorch  # noqa: F401

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def cmd_cv(args) -> int:
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_cv

    configure_logging()
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


def tlese_command() -> str:
    """How to run this tlese again from a shell: the running executable's path (a venv's `tlese` is not on PATH
    unless the venv is activated), else the `tlese` script beside this Python, else a bare `tlese`."""
    launched = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if launched is not None and launched.name == "tlese" and launched.is_file():
        return shlex.quote(str(launched.resolve()))
    beside = Path(sys.executable).parent / "tlese"
    if beside.is_file():
        return shlex.quote(str(beside.absolute()))
    return "tlese"


def cmd_demo(args) -> int:
    from tlese.data.synth import SYNTH_VERSION, synthesize
    from tlese.train.config import load_experiment
    from tlese.train.merge import merge_run

    configure_logging()
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
    run_dir = _demo_cv(experiment)
    report = merge_run(run_dir)
    private_key, public_key = _demo_keys(out / "keys")
    arm = experiment.arms[0].name
    bundle = _demo_bundle(run_dir, arm, out / "bundle", private_key, public_key)
    tlese = tlese_command()
    command = (f"{tlese} predict {shlex.quote(str(bundle))} {shlex.quote(str(paths['mammo_root']))} --out "
               f"{shlex.quote(str(out / 'predictions'))} --trusted-keys {shlex.quote(str(public_key))}")
    print(f"\ndemo finished in {time.time() - started:.0f} s (synthetic data: these numbers say the pipeline works, "
          "nothing about patients)")
    for line in demo_results(run_dir):
        print(f"  {line}")
    print(f"report: {report['html']}\nmarkdown: {report['md']}\n"
          f"bundle of {arm}: {bundle} (signed with {private_key}; trusted through {public_key})\n"
          f"run it on the synthetic DICOMs with:\n  {command}\n"
          f"disk: {out} holds {_size_text(_folder_bytes(out))} (data, prepared cache, run, bundle); each finished "
          "fold and stage 1 keep only their selected checkpoint")
    return 0


def demo_results(run_dir: Path) -> list[str]:
    """One line per arm: its pooled primary metric (macro AUC) with the 95% CI, from the run's comparison.csv that
    `merge` writes."""
    import pandas as pd

    table = pd.read_csv(Path(run_dir) / "comparison.csv", keep_default_na=False)
    pooled = [column for column in table.columns if str(column).startswith("pooled ")]
    if not pooled:
        raise ValueError(f"{Path(run_dir) / 'comparison.csv'}: no pooled metric column")
    metric = pooled[0].removeprefix("pooled ")
    return [f"{row['arm']} ({row['model']}, transfer {row['transfer']}): pooled {metric} {row[pooled[0]]} over "
            f"{row['folds']} folds' held-out {row['unit']}s" for _, row in table.iterrows()]


def _demo_cv(experiment) -> Path:
    """The demo's cross-validation, fold after fold; once a fold (and stage 1) has finished, only its selected
    checkpoint is kept: `last.ckpt` serves only to resume an unfinished stage (two 283 MB files per ResNet-50 fold
    otherwise)."""
    from tlese.train.cv import run_cv
    from tlese.train.rundir import RunDir

    run_dir = None
    for fold in range(experiment.folds):
        run_dir = run_cv(experiment, fold=fold)
        prune_checkpoints(RunDir(run_dir), [arm.name for arm in experiment.arms])
    return run_dir


def prune_checkpoints(run, arms: list[str]) -> int:
    """Delete `last.ckpt` of every finished stage (stage 1 with its done record, folds that predicted) whose selected
    checkpoint is another file; a finished stage is never resumed, it reads only its selected checkpoint. Returns
    the bytes freed."""
    freed = 0
    for name in arms:
        arm_dir = run.arm(name)
        for stage in (arm_dir.stage1, *arm_dir.predicted_folds()):
            if not stage.is_done():
                continue
            last = stage.last_checkpoint
            if last.is_file() and Path(stage.done()["best_checkpoint"]).name != last.name:
                freed += last.stat().st_size
                last.unlink()
    return freed


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _demo_keys(folder: Path) -> tuple[Path, Path]:
    """The demo's signing key pair (made once, reused by reruns): (private key, public key)."""
    from tlese.bundle.signing import generate_keypair

    private, public = folder / "tlese_signing.pem", folder / "tlese_signing.pub"
    if private.is_file() and public.is_file():
        return private, public
    return generate_keypair(folder)


def _demo_bundle(run_dir: Path, arm: str, path: Path, private_key: Path, public_key: Path) -> Path:
    """The demo's signed bundle, made once: a rerun reuses it while it still loads (signature by the demo's key,
    checksums and self-check pass)."""
    from tlese.bundle import BundleError, load_bundle
    from tlese.train.release import make_bundle

    if path.exists():
        try:
            load_bundle(path, trusted_keys=public_key)
            return path
        except BundleError as error:
            raise ValueError(f"{path}: not a usable bundle ({error}); delete it to make it again") from None
    return make_bundle(run_dir, arm, path, sign_key=private_key)


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
        "bundle", help="freeze a finished run's arm into one portable, self-checking, signed bundle (offline, CPU)",
        description="Write the arm's finished fold models (an ensemble) as safetensors, with model.json (the model "
        "spec the folds recorded when they trained: model, classes, task, preprocessing), a model card (CV metrics "
        "with patient-bootstrap CIs, transfer chain, calibration, out-of-distribution check, what it was trained and "
        "validated on, provenance), a temperature cross-fitted on the out-of-fold predictions (applied only if "
        "held-out patients confirm it helps), an out-of-distribution model of the training images' features, one "
        "ONNX file per fold checked against torch, reference inputs with their expected outputs and sha256 "
        "checksums of every file, signed with --sign. The bundle is loaded back and verified before it is moved into "
        "place.",
    )
    bundle.add_argument("run_dir", type=Path, help="the run folder (<output_dir>/<name>)")
    bundle.add_argument("--arm", required=True, help="arm name in the run's config")
    bundle.add_argument("--out", type=Path, required=True, help="bundle folder to write (must not exist)")
    bundle.add_argument("--zip", action="store_true", help="write OUT.zip instead of a folder")
    bundle.add_argument("--sign", type=Path, default=None, metavar="KEY",
                        help="Ed25519 private key (PEM, from `tlese keygen --out DIR`) to sign the bundle with; "
                             "without it the bundle is unsigned and predict refuses it unless --allow-unsigned")
    bundle.add_argument("--no-onnx", action="store_true",
                        help="leave out the ONNX files (faster; `predict --runtime onnx` then cannot use the bundle)")
    bundle.add_argument("--int8", action="store_true",
                        help="also quantise each ONNX file to int8 (calibrated on its fold's own training images) and "
                             "check it on the out-of-fold images: the int8 files are added only when the macro AUC "
                             "moves by at most 0.005; the check is in the model card either way (needs ONNX)")
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
                       n_boot=args.bootstrap, sign_key=args.sign, onnx=not args.no_onnx, int8=args.int8)
    bundle = load_bundle(path, allow_unsigned=True)  # verified with the signer's key by make_bundle already
    card, meta = bundle.card, bundle.meta
    calibration, ood, data = card["calibration"], card.get("ood") or {}, card["training_data"]
    print(f"bundle: {path}")
    print(f"  sha256 {bundle.sha256}; {meta['model']['registry_name']} x {len(bundle.models)} fold models "
          f"(folds {bundle.folds}); input {bundle.input_shape}; classes {bundle.class_names}")
    print(f"  temperature {calibration['temperature']:.4g}: "
          + ("applied" if calibration.get("applied") else "not applied (T = 1)")
          + (f" ({calibration['reason']})" if calibration.get("reason") else ""))
    if ood.get("fitted") is False:  # degenerate features: the bundle has no OOD model (tlese.bundle.ood)
        print(f"  out-of-distribution: no OOD check ({ood.get('reason')})")
    elif ood:
        rate = ood.get("false_flag_rate")
        print(f"  out-of-distribution: {ood.get('method')}, threshold {ood.get('threshold'):.4g}, false-flag rate "
              f"{'n/a' if rate is None else f'{rate:.1%}'} on held-out training {ood.get('unit', 'case')}s")
    if meta.get("onnx"):
        print(f"  ONNX: {len(meta['onnx'])} file(s), max |difference| to torch "
              f"{max(float(entry['max_abs_diff']) for entry in meta['onnx']):.2g}")
    if bundle.int8_check is not None:
        check = bundle.int8_check
        print(f"  int8: {'offered' if bundle.int8 else 'NOT offered'}: {check['reason']}; largest probability change "
              f"{check['max_abs_prob_change']:.3g} (card.md, int8 section)")
    if data.get("synthetic"):
        print("  SYNTHETIC training data: the card and every prediction say so")
    print(f"  validated on: {data.get('validated_on')}")
    if card.get("folds_missing"):
        print(f"  folds not finished, not in the bundle: {card['folds_missing']}")
    print(f"  intended use: {bundle.intended_use}")
    if args.sign is not None:
        public = args.sign.with_suffix(".pub")
        trust = f"copy {public}" if public.is_file() else "copy the signer's public key (.pub)"
        print(f"  signed with {args.sign}: sites {trust} into their trusted-keys folder ($TLESE_TRUSTED_KEYS or "
              "~/.config/tlese/trusted_keys), or pass predict --trusted-keys PUB")
    else:
        print("  UNSIGNED: predict, evaluate and serve refuse it unless --allow-unsigned. To sign: make a key pair "
              "once (`tlese keygen --out KEYS`), bundle again with --sign KEYS/tlese_signing.pem, and have sites "
              "trust KEYS/tlese_signing.pub")
    return 0
