"""`tlese node run BUNDLE --config node.yaml` (the long-running DICOM node), `tlese node status --config ...`
(studies by pseudonymous key and state) and `tlese node echo --config ...` (is the destination reachable?)."""

from __future__ import annotations

import argparse
import inspect
import signal
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "node", help="a DICOM node beside a PACS: receive mammography studies, file the SR back into each study",
        description="Receive studies by C-STORE (and/or watch a DICOMweb server), predict each quiet MG study with "
        "the bundle (the same path as `tlese predict --sr`), and send the SR back into the original study by "
        "C-STORE or STOW-RS, exactly once. See docs/pacs.md.")
    commands = parser.add_subparsers(dest="node_command", required=True, metavar="NODE_COMMAND")
    run = commands.add_parser("run", help="run the node until interrupted (SIGINT / SIGTERM)")
    run.add_argument("bundle", type=Path, help="model bundle (tlese.bundle.format)")
    run.add_argument("--config", required=True, type=Path, help="node configuration YAML (docs/pacs.md)")
    run.add_argument("--trusted-keys", type=Path, default=None,
                     help="folder of trusted bundle-signing public keys (*.pub); overrides the config")
    run.add_argument("--allow-unsigned", action="store_true", help="accept a bundle that is not (validly) signed")
    run.set_defaults(func=cmd_run)
    status = commands.add_parser("status", help="list studies by pseudonymous key, state and delivery")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the node configuration YAML (its work_dir is read)")
    where.add_argument("--work-dir", type=Path, help="the node's work folder")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status)
    echo = commands.add_parser("echo", help="check that the configured destination answers (C-ECHO or QIDO-RS)")
    echo.add_argument("--config", required=True, type=Path)
    echo.set_defaults(func=cmd_echo)


def load_node_bundle(path: Path, trusted_keys: Path | None, allow_unsigned: bool, check_references: bool = True):
    """The bundle, verified; signature options passed on where this version of the loader knows them."""
    from tlese.bundle.format import load_bundle

    options = {"trusted_keys": trusted_keys, "allow_unsigned": allow_unsigned}
    known = inspect.signature(load_bundle).parameters
    return load_bundle(path, check_references, **{name: value for name, value in options.items() if name in known})


def cmd_run(args: argparse.Namespace) -> int:
    from tlese.node.config import load_config
    from tlese.node.service import Node, setup_logging

    config = load_config(args.config)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(config.work_dir)
    bundle = load_node_bundle(args.bundle, args.trusted_keys or config.trusted_keys,
                              args.allow_unsigned or config.allow_unsigned)
    node = Node(config, bundle)
    node.start()
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    print(f"tlese node {config.ae_title}: listening on {config.host}:{node.port}" if node.port else
          f"tlese node {config.ae_title}: pull only", flush=True)
    try:
        node.run()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def status_lines(rows: list[dict]) -> list[str]:
    """A table of the queue's studies (pseudonymous keys, states, counts and verdict summaries only)."""
    header = f"{'study':16}  {'state':10} {'rev':>3} {'images':>6} {'on disk':>7}  {'delivery':10} {'tries':>5}  result"
    lines = [header]
    for row in rows:
        detail = row["summary"] or row["note"] or ""
        if row["error"] and row["delivery"] != "delivered":
            detail += f" (last error: {row['error']})"
        lines.append(f"{row['study_key']:16}  {row['state']:10} {row['revision']:>3} {row['images']:>6} "
                     f"{row['on_disk']:>7}  {row['delivery'] or '-':10} {row['attempts'] or 0:>5}  {detail}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from tlese.node.queue import read_status
    from tlese.node.service import QUEUE_FILE

    if args.config is not None:
        from tlese.node.config import load_config

        work_dir = load_config(args.config).work_dir
    else:
        work_dir = args.work_dir
    rows = read_status(Path(work_dir) / QUEUE_FILE)
    print(json.dumps(rows, indent=1) if args.json else "\n".join(status_lines(rows)))
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from tlese.node.config import load_config
    from tlese.node.deliver import DeliveryError, make_sender

    try:
        make_sender(load_config(args.config)).echo()
    except DeliveryError as error:
        print(f"tlese node echo: {error}")
        return 1
    print("tlese node echo: the destination answered")
    return 0
