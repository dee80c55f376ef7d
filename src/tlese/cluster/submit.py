"""`tlese submit`: plan a run's grid, leave out what is done or queued, and hand the rest to a scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tlese.cluster.plan import MERGE, SETUP, GridPlan, Step, plan_grid, remaining
from tlese.cluster.records import ClusterDir
from tlese.cluster.slurm import SCRIPT_NAMES, Resources, cancel_pending, require_slurm, submit, write_submission

SCHEDULERS = ("local", "slurm")


@dataclass
class SubmitResult:
    plan: GridPlan  # the steps sent (done and queued ones left out)
    folder: Path | None  # the submission folder (None: nothing to do)
    job_ids: dict[str, str] = field(default_factory=dict)  # slurm: step key -> job id
    exit_codes: dict[str, int] = field(default_factory=dict)  # local: step key -> exit code
    dry_run_text: str = ""


def _current(plan: GridPlan, scheduler: str) -> tuple[dict[str, str], dict[str, str]]:
    """Each step's state and the job ids of those queued or running, for a run folder that exists."""
    from tlese.cluster.status import PENDING, RUNNING, grid_status

    if not plan.run_dir.is_dir():
        return {}, {}
    status = grid_status(plan.run_dir, log_lines=0, query_queue=scheduler == "slurm")
    states = status.states()
    queued = {key: entry.job_id for key, entry in status.steps.items() if entry.state in (RUNNING, PENDING)}
    return states, queued


def submit_grid(config: str | Path | None = None, overrides: list[str] | None = None, *,
                resume: str | Path | None = None, scheduler: str = "local", resources: dict | None = None,
                arms: list[str] | None = None, dry_run: bool = False) -> SubmitResult:
    """Send the grid of experiment `config` (with `overrides`), or of the run folder `resume`, to `scheduler`.

    Cells already done (and, on SLURM, steps queued or running) are left out, so submitting again, or with
    `resume`, runs only what is failed or missing, then merges. `dry_run` (SLURM) writes the scripts and returns
    them as text without submitting. `resources`: `Resources` fields to set; the others come from the run's
    latest submission (so a resubmission asks for what the first one did), else their defaults."""
    from tlese.cluster.status import load_experiment_of
    from tlese.train.cv import check_experiment

    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if (config is None) == (resume is None):
        raise ValueError("give either an experiment file or --resume RUN_DIR")
    if scheduler == "slurm" and not dry_run:
        require_slurm()
    if resume is not None:
        run_dir = Path(resume).resolve()
        experiment = load_experiment_of(run_dir)
        if arms:
            raise ValueError("--arm chooses arms of a new submission; --resume runs whatever of the run is not done")
    else:
        from tlese.train.config import load_experiment

        experiment = load_experiment(config, overrides or [])
    check_experiment(experiment, arms)  # fails in a second, here, not in a queued job
    plan = plan_grid(experiment, arms)
    states, queued = _current(plan, scheduler)
    todo = remaining(plan, states) if states else plan
    if config is not None and todo.steps and not todo.has(SETUP) and SETUP not in queued:
        # The experiment file may add arms or repeats to the run: settle them (and check the rest) first.
        todo.steps.insert(0, Step(SETUP))
    if not todo.steps:
        return SubmitResult(todo, None)
    experiment_yaml = yaml.safe_dump(experiment.to_dict(), sort_keys=False)
    if scheduler == "local":
        return _local(todo, experiment_yaml, dry_run)
    chosen = Resources.from_dict({**ClusterDir(plan.run_dir).last_settings(), **(resources or {})})
    folder, submissions = write_submission(todo, chosen, experiment_yaml, queued)
    if dry_run:
        texts = [f"==> {folder / 'submit.sh'} <==\n{(folder / 'submit.sh').read_text()}"]
        texts += [f"==> {folder / name} <==\n{(folder / name).read_text()}" for kind, name in SCRIPT_NAMES.items()
                  if (folder / name).is_file()]
        return SubmitResult(todo, folder, dry_run_text="\n".join(texts))
    job_ids = submit(todo, submissions, folder, chosen)
    if MERGE in queued and todo.has(MERGE):  # the new merge waits for the new jobs; the old one would not
        cancel_pending([queued[MERGE]])
    return SubmitResult(todo, folder, job_ids=job_ids)


def _local(plan: GridPlan, experiment_yaml: str, dry_run: bool) -> SubmitResult:
    from tlese.cluster.local import run_local

    if dry_run:
        return SubmitResult(plan, None, dry_run_text="\n".join(step.describe() for step in plan.steps))
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    folder = ClusterDir(plan.run_dir).new_submission()
    (folder / "experiment.yaml").write_text(experiment_yaml)
    return SubmitResult(plan, folder, exit_codes=run_local(plan, folder))
