"""`tlese serve`'s command line: options that cannot work are one line and exit 2 before anything loads, and the
registration reads the limits' defaults without importing the web stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tlese.cli import build_parser, main


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    a_file = tmp_path / "state_is_a_file"
    a_file.write_text("x")
    cases = {("--port", "99999"): "--port 99999", ("--workers", "0"): "--workers 0",
             ("--processes", "-1"): "--processes -1",
             ("--state-dir", str(a_file)): "is a file, not a folder",
             ("--trusted-keys", str(tmp_path / "nowhere")): "--trusted-keys"}
    for option, words in cases.items():
        assert main(["serve", str(tmp_path / "no_bundle_needed"), *option]) == 2, option
        said = capsys.readouterr()
        text = said.out + said.err
        assert words in text and "Traceback" not in text, (option, text)
        assert len([line for line in text.splitlines() if line.strip()]) <= 2, text


def test_options_reach_the_limits():
    args = build_parser().parse_args(["serve", "b", "--max-per-client", "8", "--allow-unsigned", "--timeout", "30"])
    assert args.max_per_client == 8 and args.allow_unsigned and args.timeout == 30 and args.trusted_keys is None
    from tlese.serve.commands import check_options

    check_options(args)  # good options pass


@pytest.mark.parametrize("module", ["tlese.serve.uploads", "fastapi", "torch"])
def test_registering_serve_imports_no_heavy_module(module):
    code = ("import sys; from tlese.cli import build_parser; build_parser(); "
            f"print({module!r} in sys.modules)")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert printed.stdout.strip() == "False"
