"""`tlese bundle`, `tlese predict`, `tlese evaluate` and `tlese serve`: thin wrappers over tlese.serve."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    _add_bundle(subparsers)
    register_predict(subparsers)
    register_evaluate(subparsers)
    register_serve(subparsers)


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


def register_predict(subparsers) -> None:
    """Add the ``predict`` command."""
    parser = subparsers.add_parser(
        "predict", help="per-breast predictions of a model bundle on DICOM / zip / folders / a manifest CSV",
        description="Group the inputs into breasts by their DICOM tags (or a manifest CSV for PNG/JPEG), prepare "
        "every image as in training, and write one verdict (ok / degraded / refused, with reasons) and the class "
        "probabilities per breast into --out: breasts/*.json (kept across reruns), predictions.csv, "
        "predictions.json, refused_inputs.csv. Outputs are keyed by a salted pseudonymous exam key.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.serve.bundle)")
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
    from tlese.serve.bundle import load_bundle
    from tlese.serve.predict import predict

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
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.serve.bundle)")
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

    from tlese.serve.evaluate import TRAINING_OVERLAP_WARNING, evaluate_bundle

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


def register_serve(subparsers) -> None:
    """Add the ``serve`` command."""
    from tlese.serve.uploads import Limits

    defaults = Limits()
    parser = subparsers.add_parser(
        "serve", help="a local web page and JSON API serving one bundle (FastAPI + uvicorn, no internet needed)",
        description="Load the bundle once (verified) and serve it: the upload page at /, POST /api/v1/predict (the "
        "JSON of `tlese predict`), GET /api/v1/model (the model card), /healthz, /docs. Uploads live in a "
        "per-request temporary folder removed before the answer goes out; the only file written is the "
        "append-only audit log (no identifiers), with the exam-key salt beside it. No authentication and no TLS: "
        "keep it on 127.0.0.1, or put it behind the site's reverse proxy.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.serve.bundle)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="folder for the audit log and salt (default $XDG_STATE_HOME/tlese/serve, i.e. "
                             "~/.local/state/tlese/serve)")
    parser.add_argument("--audit-log", type=Path, default=None,
                        help="audit log file, JSON lines (default STATE_DIR/audit.jsonl; the salt goes beside it "
                             "as <file>.salt)")
    parser.add_argument("--salt", default=None, help="secret for the exam keys (default: made once beside the audit "
                        "log)")
    parser.add_argument("--workers", type=int, default=None,
                        help="requests predicted at once (default: 2, or 1 on a one-core machine)")
    parser.add_argument("--queue", type=int, default=defaults.max_queue,
                        help=f"admitted requests waiting beyond the workers; more get 503 (default "
                             f"{defaults.max_queue})")
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                        help=f"largest request body, MB (default {defaults.max_upload_bytes // 2**20}; 413 above)")
    parser.add_argument("--max-files", type=int, default=defaults.max_files,
                        help=f"images per request, zip members included (default {defaults.max_files}; 413 above)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help=f"largest image, rows x columns x frames, read from the header before decoding "
                             f"(default {defaults.max_pixels}; 413 above)")
    parser.add_argument("--max-unzipped-mb", type=float, default=defaults.max_unzipped_bytes / 2**20,
                        help=f"all zip members of a request together, MB (default "
                             f"{defaults.max_unzipped_bytes // 2**20}; 413 above)")
    parser.add_argument("--timeout", type=float, default=defaults.request_timeout_s,
                        help=f"seconds for upload + prediction (default {defaults.request_timeout_s:g}; 408 / 504)")
    parser.add_argument("--runtime", default="torch", help="inference runtime: torch (default) or onnx (exported "
                        "once at start)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the bundle, build the app, run uvicorn until interrupted."""
    import logging
    import os
    import warnings

    import torch
    import uvicorn

    from tlese.serve.app import create_app
    from tlese.serve.bundle import load_bundle
    from tlese.serve.uploads import Limits

    cores = os.cpu_count() or 1
    workers = args.workers or (2 if cores >= 2 else 1)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_files=args.max_files,
                    max_pixels=args.max_pixels, max_unzipped_bytes=int(args.max_unzipped_mb * 2**20),
                    request_timeout_s=args.timeout, workers=workers, max_queue=args.queue)
    # One intra-op thread per worker and core: workers side by side use the cores without oversubscribing them.
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    _withhold_header_text(logging, warnings)
    bundle = load_bundle(args.bundle)
    app = create_app(bundle, limits, state_dir=args.state_dir, audit_log=args.audit_log, salt=args.salt,
                     runtime=args.runtime, onnx_threads=threads)
    service = app.state.service
    print(f"tlese serve: bundle {bundle.sha256[:16]} ({bundle.model_name} x {len(bundle.models)}), intended use: "
          f"{bundle.intended_use}", flush=True)
    print(f"  http://{args.host}:{args.port}/  (API /api/v1/predict, docs /docs); {workers} worker(s) x {threads} "
          f"thread(s), runtime {args.runtime}; audit log {service.audit.path}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("  WARNING: listening beyond this machine without authentication or TLS; put it behind the site's "
              "reverse proxy", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _withhold_header_text(logging, warnings) -> None:
    """The service's process prints no header-derived text: pydicom / highdicom warnings and log lines may quote a
    header value (a name, an ID, a UID), so warnings are shown by category only and those loggers keep to errors."""

    def show(message, category, filename, lineno, file=None, line=None):
        logging.getLogger("tlese.serve").warning("%s from %s (text withheld: it may quote a header value)",
                                                 category.__name__, Path(filename).stem)

    warnings.showwarning = show
    for name in ("pydicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.ERROR)
