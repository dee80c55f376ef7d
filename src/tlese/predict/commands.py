"""`tlese predict`, `tlese evaluate`, `tlese export` and `tlese keygen`: thin wrappers over the prediction library
(tlese.predict) and the bundle (tlese.bundle)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    register_predict(subparsers)
    register_evaluate(subparsers)
    register_export(subparsers)
    register_keygen(subparsers)


def _add_trust_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-keys", type=Path, default=None, metavar="PATH",
                        help="folder of trusted public keys (*.pub) or one .pub file (default: $TLESE_TRUSTED_KEYS, "
                        "else ~/.config/tlese/trusted_keys)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="accept a bundle that is unsigned or not signed by a trusted key (not verified: the "
                        "maker cannot be confirmed and the bundle may have been altered)")


def _load(args: argparse.Namespace, say_synthetic: bool = True):
    """The bundle of `args.bundle`, verified against the trusted keys; says so when an unverified one is let in, and
    (unless the command's own summary does) when the bundle was trained on synthetic data."""
    from tlese.bundle.format import load_bundle

    bundle = load_bundle(args.bundle, trusted_keys=getattr(args, "trusted_keys", None),
                         allow_unsigned=getattr(args, "allow_unsigned", False))
    if not bundle.signed:
        print(f"WARNING: bundle not verified ({bundle.signature_status}); used because of --allow-unsigned")
    if say_synthetic and bundle.synthetic:
        print(f"NOTE: this bundle was trained on synthetic data, not on patients; validated on: "
              f"{bundle.validated_on}. Its outputs mean nothing clinically.")
    return bundle


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
    parser.add_argument("--runtime", default="auto",
                        help="inference runtime: auto (default: onnx when the bundle carries verified ONNX files, "
                        "else torch), torch, onnx (the bundle's own ONNX files; exported for this run when it "
                        "carries none) or onnx-int8 (the bundle's int8 files, made only when they passed its int8 "
                        "check)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="worker processes decoding and preparing images while the model predicts (default: one "
                        "per core, at most 4, when there are more than 8 breasts to predict and the runtime is not "
                        "torch; 0: all in this process)")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="progress bar on stderr (default auto: on a terminal only)")
    _add_trust_options(parser)
    parser.set_defaults(func=cmd_predict)


def _breasts_beyond_one_chunk(inputs) -> bool:
    """Whether the inputs may hold more breasts than `predict` prepares at once (a cheap guess from file counts:
    more than 2 x CHUNK files, or any zip or manifest): only then do worker processes pay for their start."""
    from tlese.predict.pipeline import CHUNK

    files = 0
    for given in inputs:
        given = Path(given)
        if given.suffix.lower() in (".zip", ".csv"):
            return True
        if given.is_dir():
            files += sum(1 for path in given.rglob("*") if path.is_file())
        else:
            files += 1
        if files > 2 * CHUNK:
            return True
    return False


def _progress_bar(mode: str):
    """(callback for `predict`'s progress, closer) showing a tqdm bar of breasts on stderr, or (None, no-op)."""
    import sys

    if mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="breast", desc="predict", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def cmd_predict(args: argparse.Namespace) -> int:
    """Load the bundle, predict, print the summary (counts, reasons and exam keys only)."""
    from tlese.predict.pipeline import predict
    from tlese.predict.prepare import Preparer, default_processes

    if args.processes is not None and args.processes < 0:
        raise ValueError(f"--processes {args.processes}: give 0 or more (or leave it out: one per core)")
    processes = default_processes(args.runtime) if args.processes is None else args.processes
    # the workers start (importing their decoders) while the bundle loads and verifies
    with Preparer(processes if _breasts_beyond_one_chunk(args.inputs) else 0) as preparer:
        preparer.start(wait=False)
        bundle = _load(args, say_synthetic=False)
        if args.runtime == "auto":
            args.runtime = "onnx" if getattr(bundle, "onnx", None) else "torch"
        if args.runtime == "onnx" and not bundle.onnx:
            print("NOTE: the bundle carries no ONNX files; exporting its models for this run (rebundle to avoid "
                  "this)")
        progress, close_bar = _progress_bar(args.progress)
        try:
            summary = predict(bundle, args.inputs, args.out, salt=args.salt, link_file=args.link_file,
                              heatmaps=args.heatmaps, sr=args.sr, runtime=args.runtime, preparer=preparer,
                              progress=progress)
        finally:
            close_bar()
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
    parser.add_argument("--task", default=None,
                        help="the task encoding the labels: a registered name, a YAML file holding a task mapping, "
                        "or an inline YAML/JSON mapping (its classes must be the bundle's; default: the bundle's own "
                        "task)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="patient-level bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    _add_trust_options(parser)
    parser.set_defaults(func=cmd_evaluate)


def _task(value: str | None, bundle):
    """The task of `--task` (what `tlese.data.tasks.resolve_task` accepts), else the bundle's own."""
    if value is None:
        return bundle.task
    from tlese.data.tasks import resolve_task

    return resolve_task(value)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from tlese.predict.validate import TRAINING_OVERLAP_WARNING, evaluate_bundle

    bundle = _load(args)
    paths = evaluate_bundle(bundle, args.dataset, args.root, _task(args.task, bundle), args.out,
                            n_boot=args.bootstrap, seed=args.seed)
    evaluation = json.loads(paths["evaluation_json"].read_text())
    print(f"external evaluation of bundle {evaluation['bundle_sha256']} on {evaluation['dataset']}: "
          f"{evaluation['evaluated_breasts']} of {evaluation['labelled_breasts']} breasts evaluated "
          f"({evaluation['degraded']} degraded, {evaluation['refused']} refused); macro AUC "
          f"{evaluation['macro_auc']:.4f} (raw {evaluation['raw_macro_auc']:.4f})")
    print(f"WARNING: {TRAINING_OVERLAP_WARNING}")
    print(f"report: {paths['html']} and {paths['md']}")
    return 0


def register_export(subparsers) -> None:
    """Add the ``export`` command."""
    parser = subparsers.add_parser(
        "export", help="a bundle's fold models as ONNX files, with a parity report",
        description="Write the bundle's fold models as OUT/onnx/fold_<k>.onnx (the bundle's own verified files, or "
        "exported now when it carries none) and OUT/parity.json: the ensemble under ONNX Runtime against the bundle's "
        "torch models on its reference cases. Exit 2 when they differ by more than 1e-4.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.bundle.format)")
    parser.add_argument("--onnx", action="store_true", help="export to ONNX (the one format for now)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <bundle name>-onnx beside "
                        "the current folder)")
    _add_trust_options(parser)
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    from tlese.predict.export import PARITY_FILE, export_bundle

    if not args.onnx:
        print("tlese export: choose a format: --onnx", file=sys.stderr)
        return 2
    out = args.out or Path(f"{args.bundle.name.removesuffix('.zip')}-onnx")
    report = export_bundle(_load(args), out)
    verdict = "within" if report["passed"] else "EXCEEDS"
    print(f"ONNX: {len(report['files'])} file(s) in {out / 'onnx'}; max abs difference vs the bundle's torch outputs "
          f"on {report['reference_cases']} reference cases: {report['max_abs_diff']:.3g} ({verdict} "
          f"{report['tolerance']:g}); report {out / PARITY_FILE}")
    return 0 if report["passed"] else 2


def register_keygen(subparsers) -> None:
    """Add the ``keygen`` command."""
    parser = subparsers.add_parser(
        "keygen", help="make an Ed25519 key pair for signing bundles",
        description="Write OUT/tlese_signing.pem (the private key, readable by you only: keep it off shared disks) "
        "and OUT/tlese_signing.pub (the public key: copy it into each site's trusted-keys folder, "
        "$TLESE_TRUSTED_KEYS or ~/.config/tlese/trusted_keys). Sign with `tlese bundle --sign OUT/tlese_signing.pem`.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the key pair")
    parser.add_argument("--name", default="tlese_signing", help="file name stem (default tlese_signing)")
    parser.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from tlese.bundle.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(args.out, args.name)
    print(f"private key: {private} (mode 0600; keep it secret)")
    print(f"public key: {public} (key id {key_id(load_public_key(public))}; give it to the sites that trust you)")
    return 0
