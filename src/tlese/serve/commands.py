"""`tlese serve`: a thin wrapper over the web app (tlese.serve.app)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    register_serve(subparsers)


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
    parser.add_argument("bundle", type=Path, help="model bundle (tlese.bundle.format)")
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

    from tlese.bundle.format import load_bundle
    from tlese.serve.app import create_app
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
