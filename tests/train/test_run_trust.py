"""What a run records and reuses when something unusual happens: changed settings, moved folds, concurrent fold jobs,
kill -9 and Ctrl-C, predictions that disagree with the fold file, chest X-ray comparisons, configs checked first."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tlese.files import sha256_file
from tlese.train.config import load_experiment
from tlese.train.cv import run_cv
from tlese.train.merge import merge_run
from tlese.train.rundir import RunDir, StaleRunError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = {"epochs": 1, "batch_size": 8, "lr": 0.002, "warmup_epochs": 0.5, "progress_bar": True,
          "accelerator": "cpu", "val_fraction": 0.25}
SCRATCH = {"name": "plain_scratch", "model": "lite0_plain", "transfer": "scratch"}
CXR_ARM = {"name": "plain_cxr", "model": "lite0_plain", "transfer": "cxr"}


@pytest.fixture(scope="module")
def synth(tiny_synth) -> dict:
    """The session's shared synthetic data (tests/conftest.py: 15 patients, 64 px, 6 chest X-rays per class)."""
    return tiny_synth


@pytest.fixture
def finished_run(tiny_run, tmp_path) -> Path:
    """A copy of the session's tiny run (all 3 folds of plain_scratch on `synth`), free to tamper with."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def config_file(folder: Path, synth: dict, name: str = "trust", **changes) -> Path:
    config = {
        "name": name, "seed": 0, "output_dir": str(folder / "runs"), "cache_dir": str(folder / "cache"),
        "image_size": 32, "views": "dual", "folds": 3, "bootstrap": 20, "prepare_workers": 1,
        "target": {"adapter": "cmmd", "root": str(synth["mammo_root"]), "task": "synth_subtype4"},
        "cxr": {"adapter": "darkcovidnet", "root": str(synth["cxr_root"]), "task": "synth_cxr3"},
        "cxr_recipe": dict(RECIPE), "target_recipe": dict(RECIPE), "arms": [SCRATCH],
    }
    config.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tlese(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tlese.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def predictions_of(run: Path, arm: str, fold: int, kind: str = "predictions_images.csv") -> bytes:
    return (run / arm / f"fold_{fold}" / kind).read_bytes()


def test_a_changed_config_is_refused_and_never_rewrites_the_record(synth, tmp_path):
    run_dir = run_cv(load_experiment(config_file(tmp_path, synth)), fold=0)
    config_before = (run_dir / "config.yaml").read_text()
    changed = load_experiment(config_file(tmp_path, synth), ["target_recipe.epochs=2"])
    with pytest.raises(StaleRunError, match=r"target_recipe\.epochs: 1 -> 2"):
        run_cv(changed, fold=0)
    renamed_model = load_experiment(config_file(tmp_path, synth), ["arms=[{name: plain_scratch, model: tlese_lite0, "
                                                                   "transfer: scratch}]"])
    with pytest.raises(StaleRunError, match=r"arms\[plain_scratch\]\.model"):
        run_cv(renamed_model, fold=0)
    assert (run_dir / "config.yaml").read_text() == config_before
    # Execution settings are not results: a job on other devices or without a progress bar reuses the fold.
    run_cv(load_experiment(config_file(tmp_path, synth), ["target_recipe.progress_bar=false"]), fold=0)
    # A new arm joins the run; --force retrains what the change touches and records the new settings.
    joined = load_experiment(config_file(tmp_path, synth, arms=[SCRATCH, {**SCRATCH, "name": "second"}]))
    run_cv(joined, arms=["second"], fold=0)
    assert [arm["name"] for arm in yaml.safe_load((run_dir / "config.yaml").read_text())["arms"]] == \
        ["plain_scratch", "second"]
    run_cv(changed, arms=["plain_scratch"], fold=0, force=True)
    recorded = json.loads((run_dir / "plain_scratch" / "fold_0" / "made_from.json").read_text())
    assert recorded["recipe"]["epochs"] == 2


def test_saved_folds_are_checked_against_the_data(synth, tmp_path):
    run_dir = run_cv(load_experiment(config_file(tmp_path, synth)), fold=0)
    folds_file = run_dir / "folds_seed0_k3.csv"
    lines = folds_file.read_text().splitlines()
    folds_file.write_text("\n".join([*lines, "NOT-IN-DATA,1"]) + "\n")
    with pytest.raises(ValueError, match="not in the data"):
        run_cv(load_experiment(config_file(tmp_path, synth)), fold=0)
    # A given fold file made from other data (its hash) is refused too.
    folds_file.write_text("\n".join(lines) + "\n")
    header = json.loads(lines[0].removeprefix("# tlese-folds "))
    other = tmp_path / "other_folds.csv"
    other.write_text("\n".join(["# tlese-folds " + json.dumps({**header, "data_hash": "0" * 16}), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="data hash"):
        run_cv(load_experiment(config_file(tmp_path, synth, name="given", folds_file=str(other))), fold=0)


def test_unknown_model_or_arm_fails_before_any_work(synth, tmp_path):
    bad = load_experiment(config_file(tmp_path, synth, arms=[{"name": "x", "model": "no_such_net",
                                                              "transfer": "scratch"}]))
    started = time.time()
    with pytest.raises(ValueError, match="no_such_net.*valid"):
        run_cv(bad)
    with pytest.raises(ValueError, match="no arm named 'nope'"):
        run_cv(load_experiment(config_file(tmp_path, synth)), arms=["nope"])
    assert time.time() - started < 30
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # nothing prepared or written


def test_stage1_is_recorded_once_with_its_checksum(synth, tmp_path, monkeypatch):
    from tlese.train import stages

    arm_config = {"name": "lite0_double", "model": "tlese_lite0", "transfer": "double"}
    experiment = load_experiment(config_file(tmp_path, synth, arms=[arm_config]))
    run_dir = run_cv(experiment, fold=0)
    arm = RunDir(run_dir).arm("lite0_double")
    summary = json.loads(arm.stage1_summary_file.read_text())
    assert summary["imagenet"] == "loaded"
    # A later job (say, on a machine without the ImageNet file) reuses stage 1: nothing rebuilds or re-records it.
    real_new_model = stages.new_model

    def new_model(arm, experiment, num_classes, views, imagenet=None):
        assert views != "single", "stage 1's model was rebuilt although the stage had finished"
        return real_new_model(arm, experiment, num_classes, views, imagenet)

    monkeypatch.setattr(stages, "new_model", new_model)
    run_cv(experiment, fold=1)
    assert json.loads(arm.stage1_summary_file.read_text()) == summary
    for fold in (0, 1):
        init = json.loads(arm.fold(fold).record_file.read_text())["init"]
        assert init["imagenet"] == "loaded"
        assert init["cxr_sha256"] == sha256_file(arm.stage1.best_checkpoint())
    chosen = summary["selected"]
    assert chosen["monitor"] == "val_loss" and "val_acc" in chosen  # the selected epoch's accuracy, not the best


def test_two_fold_jobs_started_a_second_apart_give_the_sequential_predictions(synth, tmp_path):
    sequential = run_cv(load_experiment(config_file(tmp_path, synth, name="sequential", arms=[CXR_ARM])),
                        fold=None)
    config = config_file(tmp_path, synth, name="parallel", arms=[CXR_ARM])
    first = tlese("cv", "--config", str(config), "--fold", "0")
    time.sleep(1)
    second = tlese("cv", "--config", str(config), "--fold", "1")
    results = [finish(first), finish(second)]
    for code, output in results:
        assert code == 0, output[-3000:]
    parallel = tmp_path / "runs" / "parallel"
    stage1 = RunDir(parallel).arm("plain_cxr").stage1
    assert len(list(stage1.path.glob("logs/version_*"))) == 1  # trained once: the second job waited and reused it
    for fold in (0, 1):
        assert predictions_of(parallel, "plain_cxr", fold) == predictions_of(sequential, "plain_cxr", fold)
    # Logs that are not a terminal get one line per epoch, not progress-bar frames.
    output = results[0][1]
    assert "epoch 1/1" in output and "\r" not in output


def _wait_for(path_pattern: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(path_pattern.parent.glob(path_pattern.name)):
            return
        if process.poll() is not None:
            pytest.fail(f"finished before {path_pattern} appeared: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"{path_pattern} did not appear")


def test_ctrl_c_and_kill_9_then_rerun_give_byte_identical_outputs(synth, tmp_path):
    # Long enough (tiny epochs take milliseconds) that the signals arrive while it trains, not after it finished.
    settings = ["--set", "target_recipe.epochs=40", "--set", "target_recipe.early_stopping_patience=100"]
    reference = config_file(tmp_path, synth, name="straight")
    code, output = finish(tlese("cv", "--config", str(reference), "--fold", "0", *settings))
    assert code == 0, output[-3000:]
    config = config_file(tmp_path, synth, name="interrupted")
    fold_dir = tmp_path / "runs" / "interrupted" / "plain_scratch" / "fold_0"

    process = tlese("cv", "--config", str(config), "--fold", "0", *settings)
    _wait_for(fold_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGINT)
    code, output = finish(process)
    assert code == 130 and "interrupted" in output and "the same command resumes" in output, output[-2000:]
    assert "Traceback" not in output

    process = tlese("cv", "--config", str(config), "--fold", "0", *settings)
    _wait_for(fold_dir / "logs" / "version_1" / "metrics.csv", process)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    code, output = finish(tlese("cv", "--config", str(config), "--fold", "0", *settings))
    assert code == 0, output[-3000:]
    straight = tmp_path / "runs" / "straight"
    for kind in ("predictions_images.csv", "predictions_breasts.csv"):
        assert predictions_of(tmp_path / "runs" / "interrupted", "plain_scratch", 0, kind) == \
            predictions_of(straight, "plain_scratch", 0, kind)


def test_merge_checks_predictions_against_the_fold_file(finished_run):
    run_dir = finished_run
    merge_run(run_dir)
    breasts = run_dir / "plain_scratch" / "fold_1" / "predictions_breasts.csv"
    original = breasts.read_text()
    frame = pd.read_csv(breasts)
    frame.iloc[1:].to_csv(breasts, index=False)  # one breast's prediction lost
    with pytest.raises(AssertionError, match="have no prediction"):
        merge_run(run_dir)
    breasts.write_text(original)
    folds_file = run_dir / "folds_seed0_k3.csv"
    lines = folds_file.read_text().splitlines()
    patient, fold = lines[2].split(",")
    lines[2] = f"{patient},{(int(fold) + 1) % 3}"  # the fold file now disagrees with what was trained
    folds_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(AssertionError, match="differ from fold"):
        merge_run(run_dir)


def test_outputs_carry_no_absolute_source_paths(synth, finished_run):
    run_dir = finished_run
    merge_run(run_dir)
    images = pd.read_csv(run_dir / "plain_scratch" / "fold_0" / "predictions_images.csv")
    assert "path" not in images and images["image_id"].str.startswith("CMMD/").all()
    # Per-image folder names can hold study dates: no output may carry an image's absolute path.
    image_folder = str((Path(synth["mammo_root"]) / images["image_id"].iloc[0]).resolve().parent.parent)
    for path in [*run_dir.rglob("*.csv"), *run_dir.rglob("*.md"), *run_dir.rglob("*.html"), *run_dir.rglob("*.json")]:
        assert image_folder not in path.read_text(errors="ignore"), path


def test_compare_on_chest_xrays_of_the_shared_data(cxr_dir, tmp_path):
    """Many images per patient, no side or view: the paired tests align images by image_id."""
    config = {
        "name": "cxr", "seed": 0, "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "image_size": 32, "views": "single", "folds": 2, "bootstrap": 20, "prepare_workers": 2,
        "target": {"adapter": "darkcovidnet", "root": str(cxr_dir), "task": "cxr_covid3"},
        "target_recipe": dict(RECIPE, batch_size=32, limit_train_batches=4, progress_bar=False),
        "arms": [SCRATCH, {"name": "mbv2_scratch", "model": "mbv2_plain", "transfer": "scratch"}],
    }
    path = tmp_path / "cxr.yaml"
    path.write_text(yaml.safe_dump(config))
    from tlese.cli import main

    assert main(["compare", "--config", str(path)]) == 0  # in this process: no second start of torch
    paired = pd.read_csv(tmp_path / "runs" / "cxr" / "paired_tests.csv")
    bootstrap = paired[paired["test"] == "paired patient bootstrap"]
    assert len(bootstrap) and (bootstrap["n_units"] > 800).all()  # every image matched, none dropped


def test_a_full_disk_while_a_checkpoint_is_written_ends_in_one_line_and_leaves_no_half_file(synth, tmp_path,
                                                                                           monkeypatch, capsys):
    from tlese.cli import main

    real_fsync = os.fsync

    def fsync(descriptor):  # the disk fills up when the first checkpoint reaches it
        written = Path(os.readlink(f"/proc/self/fd/{descriptor}")).name  # the atomic writer's .<name>.<random>.tmp
        if ".ckpt." in written and written.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    config = config_file(tmp_path, synth, name="full")
    assert main(["cv", "--config", str(config), "--fold", "0", "--set", "target_recipe.progress_bar=false"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tlese cv: error: ") and ".ckpt" in error and "Traceback" not in error
    fold_dir = RunDir(tmp_path / "runs" / "full").arm("plain_scratch").fold(0)
    assert not fold_dir.record_file.exists() and not list(fold_dir.path.rglob("*.ckpt*"))
    monkeypatch.undo()  # space again: the same command finishes the fold
    assert main(["cv", "--config", str(config), "--fold", "0", "--set", "target_recipe.progress_bar=false"]) == 0
    assert fold_dir.model_spec().image_size == 32
