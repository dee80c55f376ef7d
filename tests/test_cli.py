"""The command line: `tlese --help` imports no heavy library, and one error boundary per command (every expected
failure is one line `tlese <command>: error: <file>: <problem> (<fix>)` with exit code 2; the rest keep their
traceback)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlese import cli

HEAVY = ("torch", "torchvision", "lightning", "fastapi", "starlette", "pandas", "scipy", "matplotlib", "sklearn",
         "onnxruntime", "pydicom")
REGISTERED = [name for name in cli.COMMAND_MODULES if cli._exists(name)]


def _imported_by(code: str) -> list[str]:
    """Heavy top-level packages a fresh interpreter has imported after running `code`."""
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [name for name in json.loads(result.stdout.splitlines()[-1]) if name in HEAVY]


def test_the_whole_parser_imports_no_heavy_library():
    assert _imported_by("import tlese.cli; tlese.cli.build_parser()") == []


@pytest.mark.parametrize("module", REGISTERED)
def test_registering_a_command_module_imports_no_heavy_library(module):
    code = f"import argparse, {module} as m\nm.register(argparse.ArgumentParser().add_subparsers())"
    assert _imported_by(code) == []


def test_help_lists_the_commands_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "tlese.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("models", "prepare", "folds", "cv", "report", "predict", "serve"):
        assert command in result.stdout


def test_only_areas_not_written_yet_are_left_out(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("tlese.models.commands", "tlese.not_an_area.commands"))
    assert "models" in cli.build_parser().format_help()
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("tlese.models.commands", "tlese.models.not_a_module"))
    assert "models" in cli.build_parser().format_help()
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("tlese.models.blocks",))  # exists but is broken as an area: loud
    with pytest.raises(AttributeError, match="register"):
        cli.build_parser()


# ------------------------------------------------------------------------------------------------ error boundary


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tlese {command}: error: "), err
    return lines[0]


@pytest.fixture
def predictions_csv(tmp_path) -> Path:
    rows = ["fold,patient_id,side,view,target,pred,prob_a,prob_b"]
    rows += [f"{i % 2},P{i},L,CC,{i % 2},{i % 2},{0.8 - 0.6 * (i % 2)},{0.2 + 0.6 * (i % 2)}" for i in range(8)]
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_yaml_syntax_error_is_one_line_naming_the_file(tmp_path, predictions_csv, capsys):
    config = tmp_path / "resolved.yaml"
    config.write_text("model: tlese_mbv2\nfolds: [1, 2\nseed: 0\n")
    code = cli.main(["report", "--predictions", str(predictions_csv), "--out", str(tmp_path / "r"), "--config",
                     str(config), "--n-boot", "5"])
    line = _error_line(capsys, "report")
    assert code == 2
    assert f"{config}: YAML syntax error at line 3, column 5" in line and line.endswith(")")


def test_a_yaml_syntax_error_in_an_experiment_is_one_line(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(textwrap.dedent("""\
        name: broken
        target: {adapter: cmmd, root: data, task: synth_subtype4
        arms: []
        """))
    assert cli.main(["cv", "--config", str(config)]) == 2
    assert f"tlese cv: error: {config}: YAML syntax error at line" in _error_line(capsys, "cv")


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert cli.main(["report", "--predictions", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r")]) == 2
    assert str(tmp_path / "nope.csv") in _error_line(capsys, "report")
    assert cli.main(["cv", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: experiment file not found" in _error_line(capsys, "cv")


def test_out_pointing_at_a_file_is_one_line_with_the_fix(tmp_path, predictions_csv, capsys):
    taken = tmp_path / "report.txt"
    taken.write_text("not a folder\n")
    assert cli.main(["report", "--predictions", str(predictions_csv), "--out", str(taken), "--n-boot", "5"]) == 2
    line = _error_line(capsys, "report")
    assert str(taken) in line and "give a folder path (e.g. for --out)" in line
    assert cli.main(["synth", "--out", str(taken / "inside")]) == 2
    line = _error_line(capsys, "synth")
    assert str(taken) in line and "a file stands where a folder is needed" in line


def test_a_full_disk_is_one_line_however_deep_the_writer_wrapped_it(tmp_path, predictions_csv, capsys, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "r"
    assert cli.main(["report", "--predictions", str(predictions_csv), "--out", str(out), "--n-boot", "5"]) == 2
    line = _error_line(capsys, "report")
    assert line == (f"tlese report: error: writing under {out}: no space left on the disk (free some space or write "
                    "elsewhere; finished work is kept and the same command resumes)")
    try:  # wrapped in another error, as torch.save or a library may do
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "last.ckpt"))
    except OSError as cause:
        try:
            raise RuntimeError("PytorchStreamWriter failed writing file") from cause
        except RuntimeError as wrapped:
            assert cli.expected_failure(wrapped, cli.argparse.Namespace()).startswith(f"{out / 'last.ckpt'}: no space")


def test_permission_denied_is_one_line(tmp_path, predictions_csv, capsys, monkeypatch):
    import pandas as pd

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pd, "read_csv", refuse)  # root reads any file: the refusal is simulated
    assert cli.main(["report", "--predictions", str(predictions_csv), "--out", str(tmp_path / "r")]) == 2
    line = _error_line(capsys, "report")
    assert line.startswith(f"tlese report: error: {predictions_csv}: permission denied (check the owner and mode")


@pytest.mark.parametrize("error", [
    "tlese.models.spec:ModelSpecError", "tlese.bundle.format:BundleError", "tlese.data.cache:DataIntegrityError",
    "tlese.train.config:ConfigError", "tlese.data.io:ImageReadError",
])
def test_project_errors_are_one_line(error, tmp_path, capsys, monkeypatch):
    import importlib

    import tlese.models.commands as models_commands

    module, name = error.split(":")
    cls = getattr(importlib.import_module(module), name)
    instance = cls(tmp_path / "x.dcm", "not readable") if name == "ImageReadError" else \
        cls([f"{tmp_path}/x.png: two patients"]) if name == "DataIntegrityError" else \
        cls(f"{tmp_path}/model.json: the class names differ from the task's")

    def failing(args):
        raise instance

    monkeypatch.setattr(models_commands, "cmd_models", failing)
    assert cli.main(["models"]) == 2
    assert str(tmp_path) in _error_line(capsys, "models")


def test_a_multi_line_message_becomes_one_line(capsys, monkeypatch):
    import tlese.models.commands as models_commands

    def failing(args):
        raise ValueError("first problem\n  second problem\n")

    monkeypatch.setattr(models_commands, "cmd_models", failing)
    assert cli.main(["models"]) == 2
    assert _error_line(capsys, "models") == "tlese models: error: first problem; second problem"


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    import tlese.models.commands as models_commands

    def failing(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(models_commands, "cmd_models", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["models"])
    assert cli.expected_failure(TypeError("x"), cli.argparse.Namespace()) is None


def test_an_unexpected_error_from_the_command_line_shows_a_traceback_and_exit_1(tmp_path):
    # a bug in a handler (an IndexError): Python's own traceback and exit code 1, never a tidy one-line message
    code = ("import sys, tlese.cli, tlese.models.commands as c\n"
            "c.cmd_models = lambda args: [][1]\n"
            "sys.exit(tlese.cli.main(['models']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" in result.stderr and "IndexError" in result.stderr


def test_a_bad_option_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "--views", "triple"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------------------- inline tasks


def test_folds_takes_an_inline_yaml_task_and_a_task_file(tiny_synth, tmp_path, capsys):
    inline = ("{name: synth_her2, label_column: subtype, classes: [other, HER2], "
              "grouping: {HER2-enriched: HER2, Luminal A: other, Luminal B: other, triple negative: other}}")
    out = tmp_path / "folds.csv"
    root = str(tiny_synth["mammo_root"])
    command = ["folds", "--dataset", "cmmd", "--root", root, "--k", "3"]
    assert cli.main([*command, "--task", inline, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "task synth_her2: kept" in printed and "HER2=" in printed and f"folds written to {out}" in printed
    assert out.is_file()

    task_file = tmp_path / "her2.yaml"
    task_file.write_text(textwrap.dedent("""\
        name: synth_her2
        label_column: subtype
        classes: [other, HER2]
        grouping: {HER2-enriched: HER2, Luminal A: other, Luminal B: other, triple negative: other}
        """))
    again = tmp_path / "folds_again.csv"
    assert cli.main([*command, "--task", str(task_file), "--out", str(again)]) == 0
    assert again.read_text().splitlines()[1:] == out.read_text().splitlines()[1:]  # the same task, the same folds

    assert cli.main([*command, "--task", "{name: x, classes: [a, b", "--out", str(tmp_path / "bad.csv")]) == 2
    assert "inline task: YAML syntax error" in _error_line(capsys, "folds")
    assert cli.main([*command, "--task", "nope", "--out", str(tmp_path / "bad.csv")]) == 2
    assert "unknown task 'nope'; valid: " in _error_line(capsys, "folds")
