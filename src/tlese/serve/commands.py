"""`tlese serve`: a thin wrapper over the web app (tlese.serve.app)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    register_serve(subparsers)


def register_serve(subparsers) -> None:
    """Add the ``serve`` command (reads the limits' defaults only: the web stack is imported when it runs)."""
    from tlese.serve.limits import Limits

    defaults = Limits()
    parser = subparsers.add_parser(
        "serve", help="a local web page and JSON API serving one bundle (FastAPI + uvicorn, no internet needed)",
        description="Load the bundle once (verified) and serve it: the upload page at /, POST /api/v1/predict (the "
        "JSON of `tlese predict`), GET /api/v1/model (the model card), /healthz, /docs. Uploads live in a "
        "per-request folder of the service's own area (STATE_DIR/requests, emptied at start and exit) removed "
        "before the answer goes out; the only file kept is the append-only audit log (no identifiers), with the "
        "exam-key salt beside it. Each request has one deadline from its first byte (a stalled upload is closed) "
        "and one client address at most --max-per-client requests at once. No authentication and no TLS: "
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
                        help="requests predicted at once (default: 2 per core with worker processes, else 1 per "
                             "core; at least 2)")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes decoding and preparing the images of all requests (default: one per "
                             "core, at most 4: each holds about 0.55 GB; none with the torch runtime; 0: in the "
                             "request threads)")
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
                        help=f"seconds for the whole request from its first byte, upload + prediction (default "
                             f"{defaults.request_timeout_s:g}; 408 while uploading, 504 after)")
    parser.add_argument("--max-per-client", type=int, default=defaults.max_per_client,
                        help=f"requests of one client address at once, uploads included (default "
                             f"{defaults.max_per_client}; 429 above). Behind a reverse proxy every client has the "
                             "proxy's address: limit per client there")
    parser.add_argument("--trusted-keys", type=Path, default=None,
                        help="folder of trusted public keys (*.pub) the bundle's signature must verify against "
                             "(default $TLESE_TRUSTED_KEYS, else ~/.config/tlese/trusted_keys)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="serve a bundle without a valid signature (the page and the model card say so)")
    parser.add_argument("--runtime", default="auto", help="inference runtime: auto (default: onnx when the bundle "
                        "carries verified ONNX files, else torch), torch, onnx (the bundle's ONNX files, else exported "
                        "once at start) or onnx-int8 (the bundle's int8 files, made only when they passed its int8 "
                        "check)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(func=cmd_serve)


def check_options(args: argparse.Namespace) -> None:
    """ValueError (one line: the option and the fix) for options that cannot work, before anything is loaded."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a TCP port is 1 to 65535 (default 8000)")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1 (or leave it out: 2 per core)")
    if args.processes is not None and args.processes < 0:
        raise ValueError(f"--processes {args.processes}: give 0 or more (or leave it out: one per core)")
    if args.state_dir is not None and args.state_dir.exists() and not args.state_dir.is_dir():
        raise ValueError(f"--state-dir {args.state_dir}: is a file, not a folder; give a folder (made if missing)")
    if args.trusted_keys is not None and not args.trusted_keys.exists():
        raise ValueError(f"--trusted-keys {args.trusted_keys}: not found; give the folder of trusted *.pub keys")
    if args.audit_log is not None and args.audit_log.is_dir():
        raise ValueError(f"--audit-log {args.audit_log}: is a folder; give a file name for the audit log")
    if args.state_dir is not None:
        try:
            args.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--state-dir {args.state_dir}: cannot be made ({error.strerror}); give a folder you "
                             "can write") from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the options, load the bundle, build the app, run uvicorn until interrupted."""
    import logging
    import warnings

    from tlese.predict.prepare import default_processes, usable_cores
    from tlese.serve.limits import Limits

    check_options(args)
    import torch
    import uvicorn

    from tlese.bundle.format import load_bundle
    from tlese.serve.app import create_app

    _withhold_header_text(logging, warnings)
    _log_requests(logging, args.log_level)
    options = {"trusted_keys": args.trusted_keys} if args.trusted_keys is not None else {}
    bundle = load_bundle(args.bundle, **options, **({"allow_unsigned": True} if args.allow_unsigned else {}))
    if args.runtime == "auto":  # ONNX Runtime is the faster of the two (benchmarks/results/serve.md)
        args.runtime = "onnx" if getattr(bundle, "onnx", None) else "torch"
    cores = usable_cores()
    # none for torch, whose model uses the cores itself (worker processes beside it were slower)
    processes = default_processes(args.runtime) if args.processes is None else args.processes
    # with worker processes the request threads mostly wait for them: twice the cores keep the model busy meanwhile
    workers = args.workers or (max(2, 2 * cores) if processes else max(2, cores))
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_files=args.max_files,
                    max_pixels=args.max_pixels, max_unzipped_bytes=int(args.max_unzipped_mb * 2**20),
                    request_timeout_s=args.timeout, workers=workers, max_queue=args.queue,
                    max_per_client=args.max_per_client, processes=processes)
    # One intra-op thread per worker and core: workers side by side use the cores without oversubscribing them.
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    app = create_app(bundle, limits, state_dir=args.state_dir, audit_log=args.audit_log, salt=args.salt,
                     runtime=args.runtime, onnx_threads=threads)
    service = app.state.service
    service.preparer.start()  # the worker processes import the decoders now, not during the first request
    print(f"tlese serve: bundle {bundle.sha256[:16]} ({bundle.model_name} x {len(bundle.models)}), intended use: "
          f"{bundle.intended_use}", flush=True)
    print(f"  http://{args.host}:{args.port}/  (API /api/v1/predict, docs /docs); {workers} worker(s) x {threads} "
          f"thread(s), {processes} preparing process(es), runtime {args.runtime}; audit log {service.audit.path}",
          flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("  WARNING: listening beyond this machine without authentication or TLS; put it behind the site's "
              "reverse proxy", flush=True)
    if not getattr(bundle, "signed", True):
        print(f"  WARNING: the bundle is not signed by a trusted key ({getattr(bundle, 'signature_status', '')}); "
              "served because of --allow-unsigned", flush=True)
    # Idle keep-alive connections go after 5 s; beyond max_uploads + room for page and health requests, uvicorn
    # answers 503 itself. A request body's deadline is the app's (DeadlineMiddleware).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30,
                timeout_keep_alive=5, limit_concurrency=limits.max_uploads + 32)
    return 0


def _log_requests(logging, level: str) -> None:
    """The service's own log lines (one per request: id, route, status, verdict counts, seconds) on stderr."""
    logger = logging.getLogger("tlese.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s tlese.serve %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logger.propagate = False


def _withhold_header_text(logging, warnings) -> None:
    """The service's process prints no header-derived text: pydicom / highdicom warnings and log lines may quote a
    header value (a name, an ID, a UID), so warnings are shown by category only and those loggers keep to errors."""

    def show(message, category, filename, lineno, file=None, line=None):
        logging.getLogger("tlese.serve").warning("%s from %s (text withheld: it may quote a header value)",
                                                 category.__name__, Path(filename).stem)

    warnings.showwarning = show
    for name in ("pydicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.ERROR)
