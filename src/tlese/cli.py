"""The `tlese` command line: a thin layer over the Python API.

Each area of the package owns a `commands` module with `register(subparsers)`; this file only gathers them,
parses and dispatches, so a notebook user calls the very same functions.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

COMMAND_MODULES = (
    "tlese.models.commands",
    "tlese.data.commands",
    "tlese.train.commands",
    "tlese.evaluate.commands",
    "tlese.predict.commands",
    "tlese.serve.commands",
    "tlese.node.commands",
    "tlese.cluster.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlese", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # area not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def _resume_command(argv: list[str] | None) -> str:
    words = ["tlese", *(sys.argv[1:] if argv is None else argv)]
    return " ".join(shlex.quote(word) for word in words if word != "--no-resume")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, KeyError, AssertionError) as error:
        print(f"tlese {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # Finished stages, folds and prepared images are on disk; an interrupted stage resumes from its last epoch.
        detail = f" {interrupt}" if str(interrupt) else ""
        print(f"\ntlese {args.command}: interrupted.{detail}\nEverything finished is kept; the same command resumes: "
              f"{_resume_command(argv)}", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
