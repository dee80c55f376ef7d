"""The grid on a real SLURM (started by conftest): the same predictions as in-process, requeue, failure and resume.

One tiny grid (2 arms, one with a chest X-ray stage 1, x 2 folds x 1 repeat, 32 px) is run twice: with
`tlese submit --scheduler local` and with `--scheduler slurm`. While the SLURM grid runs, one cell is requeued with
`scontrol requeue` after its first epoch (it must resume from that epoch) and another gets the time-limit signal (its
job requeues itself). Both runs' predictions must be byte-identical. Then one cell is broken, resubmitted, shown as
failed with its log lines, fixed, and `submit --resume` runs only it and the merge.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from grid_helpers import write_grid_config
from minicluster import job_state

from tlese.cluster.plan import CELL, Step
from tlese.cluster.records import ClusterDir
from tlese.cluster.status import DONE, FAILED, grid_status
from tlese.cluster.submit import submit_grid
from tlese.train.rundir import RunDir

pytestmark = pytest.mark.slow

REQUEUED = Step(CELL, "plain_scratch", 0, 0)  # requeued by `scontrol requeue` after its first epoch
SIGNALLED = Step(CELL, "cxr_plain", 0, 1)  # gets the time-limit signal: its job requeues itself
BROKEN = Step(CELL, "plain_scratch", 0, 1)  # broken after the grid, then resubmitted
WAIT_LIMIT = 900  # seconds: a safety net against a hung cluster, far above what the grid needs


def tlese(*words: str, env: dict | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "tlese.cli", *words], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=WAIT_LIMIT)
    output = f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    assert completed.returncode == 0, f"tlese {' '.join(words)}:\n{output}"
    return completed


def scontrol(*words: str) -> None:
    subprocess.run(["scontrol", *words], check=True, capture_output=True, text=True)


def job_of(run_dir: Path, step: Step) -> str:
    return ClusterDir(run_dir).jobs()[step.key]["job_id"]


def wait_for(condition, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"gave up waiting ({WAIT_LIMIT} s) for {what}")


def wait_until_idle(run_dir: Path) -> None:
    """Until none of the run's jobs is queued or running any more."""
    def idle() -> bool:
        ids = {job["job_id"] for job in ClusterDir(run_dir).jobs().values()}
        return not any(job_state(job) for job in ids)

    wait_for(idle, f"the jobs of {run_dir} to end", interval=2.0)


def training_process(run_dir: Path, step: Step) -> int:
    """The pid of the cell's `tlese cv` process (the one srun started on this node)."""
    config = f"{run_dir}/config.yaml"
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            continue
        if entry.name.isdigit() and "srun" not in words[0] and "cv" in words and config in words \
                and words[words.index("--fold") + 1] == str(step.fold) and step.arm in words:
            return int(entry.name)
    return 0


def complete_checkpoint(path: Path) -> bool:
    """The file is a whole torch checkpoint (a zip whose central directory, written last, is there)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def requeue_after_first_epoch(run_dir: Path, step: Step) -> None:
    """`scontrol requeue` the cell once its first epoch is saved and before it finishes. The training process runs
    in short slices between SIGSTOP and SIGCONT and is looked at while stopped, so the moment is not a race with the
    training's speed."""
    job = job_of(run_dir, step)
    wait_for(lambda: training_process(run_dir, step), f"{step.key} ({job}) to start training", interval=0.2)
    pid = training_process(run_dir, step)
    fold = RunDir(run_dir).arm(step.arm, step.repeat).fold(step.fold)
    while True:
        os.kill(pid, signal.SIGSTOP)
        assert not fold.is_predicted(), f"{step.key} finished inside one slice; the requeue test cannot run"
        if complete_checkpoint(fold.last_checkpoint):
            scontrol("requeue", job)  # SLURM signals the job; the stopped process gets it when continued
            os.kill(pid, signal.SIGCONT)
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def local_run(grid_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("local")
    tlese("submit", str(write_grid_config(folder / "grid.yaml", grid_data)))
    return folder / "runs" / "grid"


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, grid_data, tmp_path_factory, local_run) -> Path:
    folder = tmp_path_factory.mktemp("slurm")
    config = write_grid_config(folder / "grid.yaml", grid_data)
    run_dir = folder / "runs" / "grid"
    tlese("submit", str(config), "--scheduler", "slurm", "--cpus-per-job", "1", "--time", "00:20:00")
    signalled = job_of(run_dir, SIGNALLED)
    scontrol("hold", signalled)  # it waits for setup and stage 1: held in time, released after the requeue below
    requeue_after_first_epoch(run_dir, REQUEUED)
    scontrol("release", signalled)
    # Once its batch shell has set its trap (the start line), what SLURM sends `--signal` seconds before the time
    # limit: SIGUSR1 to the batch shell.
    wait_for(lambda: any(event.event == "start" for event in ClusterDir(run_dir).events(SIGNALLED.key)),
             f"{SIGNALLED.key} to start", interval=0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", signalled], check=True)
    wait_until_idle(run_dir)
    return run_dir


def predictions(run_dir: Path) -> dict[str, bytes]:
    found = {path.relative_to(run_dir).as_posix(): path.read_bytes() for path in run_dir.glob("*/fold_*/predictions_*")}
    assert found, f"no predictions in {run_dir}"
    return found


def test_slurm_grid_ends_with_the_local_grids_predictions(local_run, slurm_run):
    status = grid_status(slurm_run)
    assert {entry.state for entry in status.steps.values()} == {DONE}, status.states()
    assert predictions(slurm_run) == predictions(local_run)
    assert len(predictions(slurm_run)) == 2 * 2 * 2  # 2 arms x 2 folds, images and breasts
    assert (slurm_run / "paired_tests.csv").read_bytes() == (local_run / "paired_tests.csv").read_bytes()
    assert (slurm_run / "report.html").is_file()
    # one job per stage 1, an array per (arm, repeat), cells after their own stage 1 only
    jobs = json.loads(next(ClusterDir(slurm_run).submissions()[0].glob("jobs.json")).read_text())["jobs"]
    assert sorted(jobs) == ["cells_cxr_plain_r0", "cells_plain_scratch_r0", "merge", "setup", "stage1_cxr_plain_r0"]
    submit_sh = (ClusterDir(slurm_run).submissions()[0] / "submit.sh").read_text()
    assert "--dependency=afterok:$setup:$stage1_cxr_plain_r0 --kill-on-invalid-dep=yes" in submit_sh
    assert "--dependency=afterok:$setup --kill-on-invalid-dep=yes" in submit_sh.split("cells_plain_scratch_r0=")[1]


def test_requeued_cell_resumes_from_its_first_epoch(slurm_run):
    events = ClusterDir(slurm_run).events(REQUEUED.key)
    assert [event.attempt for event in events if event.event == "start"] == [0, 1]
    assert (events[-1].event, events[-1].attempt, events[-1].detail) == ("end", 1, "0")
    done = json.loads((RunDir(slurm_run).arm(REQUEUED.arm).fold(REQUEUED.fold).done_file).read_text())
    assert done["resumed_from"] == "last.ckpt"
    log = Path(ClusterDir(slurm_run).jobs()[REQUEUED.key]["log"]).read_text()
    assert "DUE TO JOB REQUEUE" in log and "attempt 1" in log


def test_time_limit_signal_requeues_the_job(slurm_run):
    events = [(event.event, event.attempt) for event in ClusterDir(slurm_run).events(SIGNALLED.key)]
    assert ("signal", 0) in events and ("start", 1) in events and events[-1] == ("end", 1)
    assert RunDir(slurm_run).arm(SIGNALLED.arm).fold(SIGNALLED.fold).is_predicted()


def test_failed_cell_is_shown_then_resume_runs_only_it(local_run, slurm_run):
    fold = RunDir(slurm_run).arm(BROKEN.arm).fold(BROKEN.fold)
    expected = predictions(slurm_run)
    shutil.rmtree(fold.path)
    fold.path.mkdir()
    fold.made_from_file.write_text("{ not json")  # an unreadable record: the cell's job must fail on it

    submitted = submit_grid(resume=slurm_run, scheduler="slurm")  # the library call behind `tlese submit --resume`
    assert [step.key for step in submitted.plan.steps] == [BROKEN.key, "merge"]
    job = submitted.job_ids[BROKEN.key]
    wait_for(lambda: any(event.event == "end" for event in ClusterDir(slurm_run).events(BROKEN.key)
                         if event.job_id == job), f"{BROKEN.key} to fail")
    entry = grid_status(slurm_run).of(BROKEN)
    assert entry.state == FAILED and entry.exit_code == 2 and entry.job_id == job
    assert any("unreadable record" in line for line in entry.log_tail)
    shown = tlese("status", str(slurm_run)).stdout
    assert "failed (2)" in shown and "unreadable record" in shown and str(fold.made_from_file) in shown
    assert f"tlese submit --resume {slurm_run}" in shown

    shutil.rmtree(fold.path)  # the fix the error message asks for
    resubmitted = tlese("submit", "--resume", str(slurm_run), "--scheduler", "slurm").stdout
    assert "1 cell(s), 0 stage-1 step(s), no setup step, a merge" in resubmitted
    latest = json.loads((ClusterDir(slurm_run).submissions()[-1] / "jobs.json").read_text())
    assert sorted(latest["steps"]) == [BROKEN.key, "merge"]
    wait_until_idle(slurm_run)
    status = grid_status(slurm_run)
    assert {entry.state for entry in status.steps.values()} == {DONE}, status.states()
    assert predictions(slurm_run) == expected == predictions(local_run)
