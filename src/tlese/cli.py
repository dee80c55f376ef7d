"""The `tlese` command line: a thin layer over the Python API.

Each area of the package owns a `commands` module with `register(subparsers)`; this file only gathers them,
parses and dispatches, so a notebook user calls the very same functions. Registering imports no torch, pandas or
web framework: a command imports what it needs when it runs, so `tlese --help` is instant.

One error boundary for every command (`main`): an expected failure (a bad config or input, a missing file, a full
disk, a permission, a project error such as BundleError or DataIntegrityError) is one line
`tlese <command>: error: <file>: <problem> (<fix>)` and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
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

# Failures the project raises on purpose, all naming their file (ConfigError, BundleError, ModelSpecError,
# DataIntegrityError, ImageReadError... are ValueErrors; merge's record checks are AssertionErrors).
EXPECTED_ERRORS = (ValueError, KeyError, AssertionError)

# errno -> (problem, fix) for the operating system's refusals
OS_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the disk", "free some space or write elsewhere; finished work is kept and the "
                   "same command resumes"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere; finished work is kept"),
    errno.EACCES: ("permission denied", "check the owner and mode of the file or folder, or run as a user who may "
                   "use it"),
    errno.EPERM: ("operation not permitted", "check the owner and mode of the file or folder"),
    errno.ENOENT: ("not found", "check the path"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "give a folder path (e.g. for --out) or move the file"),
    errno.EEXIST: ("exists and is not a folder", "give a folder path (e.g. for --out) or move the file away"),
    errno.EISDIR: ("is a folder where a file is needed", "give a file path"),
    errno.EROFS: ("read-only file system", "write elsewhere"),
}


def _exists(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # its package does not exist
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlese", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        if _exists(module_name):  # an area still being written is left out; a broken one fails loudly
            importlib.import_module(module_name).register(subparsers)
    return parser


def _resume_command(argv: list[str] | None) -> str:
    words = ["tlese", *(sys.argv[1:] if argv is None else argv)]
    return " ".join(shlex.quote(word) for word in words if word != "--no-resume")


def _causes(error: BaseException):
    """The error and the exceptions it was raised from or during, innermost last."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_yaml_error(error: BaseException) -> bool:
    # Checked by name, so that this module does not import yaml.
    return any(cls.__name__ == "YAMLError" and cls.__module__.startswith("yaml") for cls in type(error).__mro__)


def _yaml_message(error: BaseException, args: argparse.Namespace) -> str:
    mark = getattr(error, "problem_mark", None)
    name = getattr(mark, "name", None)
    if name and not name.startswith("<"):
        source = name
    elif getattr(args, "config", None):  # parsed from text: the config file, or a `--set` value beside it
        source = f"{args.config}{' or a --set value' if getattr(args, 'overrides', None) else ''}"
    else:
        source = "YAML input"
    place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{source}: YAML syntax error{place}: {problem} (fix the syntax there; a mapping is 'key: value')"


def _os_message(error: OSError, args: argparse.Namespace) -> str:
    if error.errno is None:  # raised by the project with its own words ("<path>: ... not found")
        return str(error)
    problem, fix = OS_PROBLEMS.get(error.errno, (error.strerror or str(error), "check the file and the disk"))
    files = [str(name) for name in (error.filename, error.filename2) if name is not None]
    if not files and getattr(args, "out", None):
        files = [f"writing under {args.out}"]
    return f"{' -> '.join(files) or 'file'}: {problem} ({fix})"


def expected_failure(error: BaseException, args: argparse.Namespace) -> str | None:
    """The one-line message for an expected failure, None for an unexpected one (which keeps its traceback)."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return _os_message(cause, args)  # a full disk, however deep the writer wrapped it
    if _is_yaml_error(error):
        return _yaml_message(error, args)
    if isinstance(error, OSError):
        return _os_message(error, args)
    if isinstance(error, EXPECTED_ERRORS):
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        return str(text)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt as interrupt:
        # Finished stages, folds and prepared images are on disk; an interrupted stage resumes from its last epoch.
        detail = f" {interrupt}" if str(interrupt) else ""
        print(f"\ntlese {args.command}: interrupted.{detail}\nEverything finished is kept; the same command resumes: "
              f"{_resume_command(argv)}", file=sys.stderr)
        return 130
    except Exception as error:
        message = expected_failure(error, args)
        if message is None:
            raise
        one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
        print(f"tlese {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
