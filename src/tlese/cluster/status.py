"""`tlese status RUN`: every step of a run's grid as done, running, pending, failed or missing.

"Done" is read from the run folder alone (a fold's predictions and record, stage 1's checkpoint, the fold files, the
report), so a grid run by hand, by the local scheduler or by SLURM reads the same. For steps not done, the latest
job submitted for them says the rest: queued or running (from `squeue`), or failed with the exit code the job wrote
into its state file and the last lines of its log, or missing (never submitted, or cancelled before it started, e.g.
because the stage 1 it waited for failed).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tlese.cluster.plan import CELL, MERGE, SETUP, STAGE1, GridPlan, Step, plan_grid
from tlese.cluster.records import ClusterDir, tail

DONE, RUNNING, PENDING, FAILED, MISSING = "done", "running", "pending", "failed", "missing"


@dataclass
class StepStatus:
    step: Step
    state: str
    job_id: str = ""
    exit_code: int | None = None
    detail: str = ""
    log: Path | None = None
    log_tail: list[str] = field(default_factory=list)

    def short(self) -> str:
        """The table's word for it: `done`, `running 12_3`, `failed (2)`, ..."""
        if self.state in (RUNNING, PENDING) and self.job_id:
            return f"{self.state} {self.job_id}"
        if self.state == FAILED:
            return f"failed ({self.exit_code})" if self.exit_code is not None else "failed (killed)"
        return self.state


@dataclass
class GridStatus:
    plan: GridPlan
    steps: dict[str, StepStatus]
    queue_problem: str = ""  # why squeue could not be read (running and pending are then guesses)

    def of(self, step: Step) -> StepStatus:
        return self.steps[step.key]

    def states(self) -> dict[str, str]:
        return {key: status.state for key, status in self.steps.items()}

    def counts(self) -> dict[str, int]:
        cells = [self.steps[step.key].state for step in self.plan.grid()]
        return {state: cells.count(state) for state in (DONE, RUNNING, PENDING, FAILED, MISSING)}


def load_experiment_of(run_dir: Path):
    """The run's experiment: its settled config, or (before setup ran) the one its first submission wrote."""
    from tlese.train.config import load_experiment
    from tlese.train.rundir import RunDir

    run = RunDir(Path(run_dir))
    if run.config_file.is_file():
        return load_experiment(run.config_file)
    for folder in ClusterDir(run.path).submissions():
        if (folder / "experiment.yaml").is_file():
            return load_experiment(folder / "experiment.yaml")
    raise FileNotFoundError(f"{run.path}: neither a run folder (no config.yaml) nor a submitted grid (no "
                            f"{ClusterDir(run.path).path.name}/submission_*/experiment.yaml)")


def is_done(step: Step, run_dir: Path, experiment) -> bool:
    from tlese.train.rundir import RunDir, repeat_seed

    run = RunDir(Path(run_dir))
    if step.kind == SETUP:
        return run.config_file.is_file() and all(
            run.folds_file(repeat_seed(experiment.seed, repeat), experiment.folds).is_file()
            for repeat in range(experiment.repeats))
    if step.kind == STAGE1:
        arm_dir = run.arm(step.arm, step.repeat)
        return arm_dir.stage1.is_done() and arm_dir.stage1_summary_file.is_file()
    if step.kind == CELL:
        return run.arm(step.arm, step.repeat).fold(step.fold).is_predicted()
    report = run.path / "report.html"
    records = [fold.record_file.stat().st_mtime for arm in experiment.arms for repeat in range(experiment.repeats)
               for fold in run.arm(arm.name, repeat).predicted_folds()]
    return report.is_file() and report.stat().st_mtime >= max(records, default=0)


def _local_alive(job_id: str) -> bool:
    """A local scheduler's job id is `local:<host>:<pid>`: alive when that process still runs on this host."""
    _, host, pid = (job_id.split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status_of(step: Step, done: bool, job: dict | None, queue: dict[str, tuple[str, str]] | None,
               records: ClusterDir, log_lines: int) -> StepStatus:
    """`queue` None: it could not be read, so a started job without an end record may still be running."""
    if done:
        return StepStatus(step, DONE, job_id=(job or {}).get("job_id", ""))
    if job is None:
        return StepStatus(step, MISSING, detail="never submitted")
    job_id, log = job["job_id"], Path(job["log"]) if job.get("log") else None
    if queue is not None and job_id in queue:
        state, reason = queue[job_id]
        word = RUNNING if state in ("RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING") else PENDING
        return StepStatus(step, word, job_id=job_id, detail=f"{state.lower()} ({reason})" if reason else state.lower(),
                          log=log)
    events = [event for event in records.events(step.key) if event.job_id == job_id]
    if not events:
        return StepStatus(step, MISSING, job_id=job_id,
                          detail=f"job {job_id} is not queued and never started (cancelled, e.g. because a step it "
                                 "waited for failed)")
    last = events[-1]
    if last.event == "start" and job.get("scheduler") == "local" and _local_alive(job_id):
        return StepStatus(step, RUNNING, job_id=job_id, detail="running in another process", log=log)
    if last.event == "start" and job.get("scheduler") == "slurm" and queue is None:
        return StepStatus(step, RUNNING, job_id=job_id, detail=f"started {last.time}; not checked (no queue)", log=log)
    if last.event == "end" and last.detail.lstrip("-").isdigit() and int(last.detail) != 0:
        return StepStatus(step, FAILED, job_id=job_id, exit_code=int(last.detail), log=log,
                          detail=f"exit code {last.detail} (attempt {last.attempt + 1}, ended {last.time})",
                          log_tail=tail(log, log_lines))
    if last.event == "end":
        detail = f"its job ended with exit code 0 at {last.time} but left no result"
    else:
        detail = (f"started {last.time} (attempt {last.attempt + 1}) and ended without an exit record: killed (time "
                  "limit, memory, cancelled or node failure)")
    return StepStatus(step, FAILED, job_id=job_id, detail=detail, log=log, log_tail=tail(log, log_lines))


def grid_status(run_dir: str | Path, log_lines: int = 10, query_queue: bool = True) -> GridStatus:
    """The status of every step of the run's grid (setup, stage 1s, cells, merge)."""
    from tlese.cluster.slurm import SlurmError, queue_states

    run_dir = Path(run_dir).resolve()
    experiment = load_experiment_of(run_dir)
    plan = plan_grid(experiment)
    records = ClusterDir(run_dir)
    jobs = records.jobs()
    done = {step.key: is_done(step, run_dir, experiment) for step in plan.steps}
    slurm_ids = [job["job_id"] for key, job in jobs.items() if job.get("scheduler") == "slurm" and not done.get(key)]
    queue, problem = {}, ""
    if query_queue and slurm_ids:
        try:
            queue = queue_states(slurm_ids)
        except SlurmError as error:
            queue, problem = None, str(error)
    steps = {step.key: _status_of(step, done[step.key], jobs.get(step.key), queue, records, log_lines)
             for step in plan.steps}
    return GridStatus(plan, steps, problem)


def format_status(status: GridStatus) -> str:
    """The grid as a table (arm x repeat rows, stage 1 and fold columns), then what failed, with log lines."""
    plan = status.plan
    counts = status.counts()
    lines = [f"{plan.run_dir}: {len(plan.arms)} arm(s) x {plan.repeats} repeat(s) x {plan.folds} folds = "
             f"{len(plan.grid())} cells: " + ", ".join(f"{counts[state]} {state}" for state in counts)]
    if status.queue_problem:
        lines.append(f"(the SLURM queue could not be read, so started jobs count as running: {status.queue_problem})")
    header = ["arm", "repeat", "stage 1", *(f"fold {fold}" for fold in range(plan.folds))]
    rows = []
    for arm in plan.arms:
        for repeat in range(plan.repeats):
            stage1 = status.of(Step(STAGE1, arm, repeat)).short() if arm in plan.stage1_arms else "-"
            rows.append([arm, str(repeat), stage1,
                         *(status.of(Step(CELL, arm, repeat, fold)).short() for fold in range(plan.folds))])
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    lines.append(f"setup: {status.of(Step(SETUP)).short()}; merge: {status.of(Step(MERGE)).short()}")
    problems = [entry for entry in status.steps.values() if entry.state in (FAILED, MISSING) and entry.job_id]
    for entry in problems:
        lines.append(f"\n{entry.step.describe()}: {entry.state}, job {entry.job_id}: {entry.detail}")
        if entry.log is not None:
            lines.append(f"  log {entry.log}" + (":" if entry.log_tail else " (empty or absent)"))
        lines += [f"  | {line}" for line in entry.log_tail]
    if counts[FAILED] or counts[MISSING]:
        lines.append(f"\nfix the cause, then run what is failed or missing (and the merge): tlese submit --resume "
                     f"{plan.run_dir}")
    return "\n".join(lines)
