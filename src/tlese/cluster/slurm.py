"""The grid as SLURM jobs: plain sbatch scripts written into the run folder, submitted with their dependencies.

Per submission: one `setup` job; one job per stage 1 (arm, repeat) after setup; one job array per (arm, repeat) of
its folds after setup and after that stage 1 (`afterok`, cancelled when it fails); one `merge` job after everything
(`afterany`) that prints the grid's status and merges what finished. Four scripts serve all jobs (arm and repeat
are arguments, the fold is the array index) and `submit.sh` lists the sbatch commands in order: both are records of
how the run was made, and `--dry-run` writes and prints them without submitting.

Time limits and preemption: every job asks for SIGUSR1 on its batch shell `--signal` seconds before its limit; the
shell then requeues the job (`scontrol requeue`), which stops the training and queues the job again. The requeued
job resumes its stage from the last finished epoch (`last.ckpt`), which is exact (every epoch is seeded by its
number), so it ends with the same predictions as an uninterrupted one. A requeue by an administrator or by
preemption takes the same path.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tlese.cluster.plan import CELL, MERGE, SETUP, STAGE1, GridPlan, Step
from tlese.cluster.records import ClusterDir

SCRIPT_NAMES = {SETUP: "setup.sbatch", STAGE1: "stage1.sbatch", CELL: "cells.sbatch", MERGE: "merge.sbatch"}


class SlurmError(RuntimeError):
    """sbatch or squeue failed, or SLURM is not reachable from here."""


@dataclass
class Resources:
    """What each training job (stage 1 and cells) asks SLURM for; setup and merge ask for CPUs only."""

    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = 0  # > 1: DDP inside the job, one task per GPU (Lightning's SLURM environment)
    cpus_per_job: int | None = None  # per task; also OMP_NUM_THREADS inside the job
    mem: str | None = None  # e.g. 32G
    time: str | None = None  # HH:MM:SS or D-HH:MM:SS
    max_running: int | None = None  # cells of one (arm, repeat) running at once (the array throttle %K)
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: requeue
    sbatch_options: list[str] = field(default_factory=list)  # anything else, e.g. --qos=long (every job)

    def __post_init__(self) -> None:
        if self.gpus_per_job < 0:
            raise ValueError(f"--gpus-per-job must be >= 0, got {self.gpus_per_job}")
        if self.cpus_per_job is not None and self.cpus_per_job < 1:
            raise ValueError(f"--cpus-per-job must be >= 1, got {self.cpus_per_job}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"--max-running must be >= 1, got {self.max_running}")
        if self.signal_seconds < 1:
            raise ValueError(f"--signal-seconds must be >= 1, got {self.signal_seconds}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> Resources:
        return cls(**{key: item for key, item in value.items() if key in cls.__dataclass_fields__})


def tlese_executable() -> str:
    """How the jobs call tlese: the `tlese` script beside this Python, else `python -m tlese.cli`."""
    script = Path(sys.executable).parent / "tlese"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m tlese.cli"


def _directives(kind: str, resources: Resources, cwd: Path) -> list[str]:
    trains = kind in (STAGE1, CELL)
    tasks = max(1, resources.gpus_per_job) if trains else 1
    options = [("partition", resources.partition), ("account", resources.account), ("time", resources.time),
               ("nodes", "1"), ("ntasks-per-node", str(tasks)),
               ("cpus-per-task", None if resources.cpus_per_job is None else str(resources.cpus_per_job)),
               ("mem", resources.mem if trains else None),
               ("gres", f"gpu:{resources.gpus_per_job}" if trains and resources.gpus_per_job else None),
               ("signal", f"B:USR1@{resources.signal_seconds}"), ("requeue", ""), ("open-mode", "append"),
               ("chdir", str(cwd))]
    lines = [f"#SBATCH --{name}" + (f"={value}" if value else "") for name, value in options if value is not None]
    return lines + [f"#SBATCH {option}" for option in resources.sbatch_options]


def _gpu_settings(resources: Resources) -> str:
    """`--set` words that put both recipes on the job's GPUs (execution settings: they do not change results'
    records). Several GPUs: DDP, one process per GPU, started by srun and wired by Lightning's SLURM environment."""
    if not resources.gpus_per_job:
        return ""
    words = []
    for recipe in ("cxr_recipe", "target_recipe"):
        words += [f"--set {recipe}.accelerator=gpu", f"--set {recipe}.devices={resources.gpus_per_job}"]
        if resources.gpus_per_job > 1:
            words.append(f"--set {recipe}.strategy=ddp")
    return " ".join(words)


_PREAMBLE = """set -uo pipefail
run={run}
tlese=({tlese})
# srun starts one task per GPU; each learns its rank before Lightning starts, as in Lightning's own launcher (only
# rank 0 takes a fold's lock and writes its records)
ranked=(bash -c 'export LOCAL_RANK=$SLURM_LOCALID; exec "$@"' rank)
state_dir=$run/cluster/state
attempt=${{SLURM_RESTART_COUNT:-0}}
if [[ -n ${{SLURM_CPUS_PER_TASK:-}} ]]; then export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK; fi
note() {{ echo "$1 $(date -u +%Y-%m-%dT%H:%M:%SZ) $job $attempt $2" >> "$state_dir/$step.txt"; }}
requeue() {{ note signal "time limit near: requeued"; scontrol requeue "$SLURM_JOB_ID"; }}
trap requeue USR1  # sent --signal seconds before the time limit (see the #SBATCH lines)
"""

_RUN = """note start "$(hostname)"
echo "== $step, job $job, attempt $attempt, on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
{command} &
child=$!
wait "$child"; code=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done  # a trapped signal only interrupts wait
note end "$code"
exit "$code"
"""

_BODIES = {
    SETUP: ("settle the run folder (config, prepared data, every repeat's folds)",
            'job=$SLURM_JOB_ID\nstep=setup\nconfig=$1',
            'srun "${{tlese[@]}}" setup-run --config "$config"'),
    STAGE1: ("stage 1 (chest X-ray) of arm $1 for repeat $2",
             'job=$SLURM_JOB_ID\narm=$1\nrepeat=$2\nstep=stage1_${{arm}}_r${{repeat}}',
             'srun "${{ranked[@]}}" "${{tlese[@]}}" stage1 --config "$run/config.yaml" --arm "$arm" '
             '--repeat "$repeat" {gpu}'),
    CELL: ("one cell: arm $1, repeat $2, fold = the array index",
           'job=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\narm=$1\nrepeat=$2\nfold=$SLURM_ARRAY_TASK_ID\n'
           'step=cell_${{arm}}_r${{repeat}}_f${{fold}}',
           'srun "${{ranked[@]}}" "${{tlese[@]}}" cv --config "$run/config.yaml" --arm "$arm" --repeat "$repeat" '
           '--fold "$fold" {gpu}'),
    MERGE: ("merge what finished (the grid's status first: what is missing is named)",
            'job=$SLURM_JOB_ID\nstep=merge',
            '{{ "${{tlese[@]}}" status "$run"; "${{tlese[@]}}" merge "$run"; }}'),
}


def render_script(kind: str, run_dir: Path, resources: Resources, cwd: Path, tlese: str | None = None) -> str:
    """The sbatch script of one kind of step."""
    what, variables, command = _BODIES[kind]
    header = ["#!/bin/bash", f"# tlese grid job: {what}.",
              "# Written by `tlese submit`; kept in the run folder as the record of how the run was made.",
              *_directives(kind, resources, cwd), ""]
    body = [_PREAMBLE.format(run=shlex.quote(str(run_dir)), tlese=tlese or tlese_executable()),
            variables.format() + "\n",
            _RUN.format(command=command.format(gpu=_gpu_settings(resources)).rstrip())]
    return "\n".join(header) + "\n".join(body)


def _array_spec(folds: list[int], max_running: int | None) -> str:
    """`0-5`, `0,2,4-5` ... with `%K` when the array is throttled."""
    folds = sorted(folds)
    ranges, start = [], folds[0]
    for previous, current in zip(folds, [*folds[1:], None]):
        if current != previous + 1:
            ranges.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(ranges) + (f"%{max_running}" if max_running else "")


@dataclass
class Submission:
    """One sbatch call: a shell variable for its job id, its options, script, arguments and what it waits for."""

    variable: str
    steps: list[Step]
    options: list[str]
    script: str
    arguments: list[str]
    after: list[str]  # variables of this submission, or job ids queued by an earlier one
    dependency: str = "afterok"

    def argv(self, ids: dict[str, str] | None = None) -> list[str]:
        """The sbatch command; with `ids` the dependencies are job ids, else shell variables (for submit.sh).
        A name in `after` is a variable of this submission; a job id (digits) was queued by an earlier one."""
        waits = [ids.get(name, name) if ids is not None else (name if name[0].isdigit() else f"${name}")
                 for name in self.after]
        dependency = [f"--dependency={self.dependency}:{':'.join(waits)}"] if waits else []
        cancel = ["--kill-on-invalid-dep=yes"] if self.dependency == "afterok" and waits else []
        return ["sbatch", "--parsable", *self.options, *dependency, *cancel, self.script, *self.arguments]


def _shell_name(text: str) -> str:
    return "".join(char if char.isalnum() else "_" for char in text)


def build_submissions(plan: GridPlan, folder: Path, queued: dict[str, str],
                      max_running: int | None = None) -> list[Submission]:
    """The sbatch calls of a plan, in order. `queued`: step key -> job id of steps already queued or running (from
    an earlier submission), which new steps wait for instead of submitting them again."""
    name = plan.run_dir.name
    logs = ClusterDir(plan.run_dir).logs
    submissions: list[Submission] = []
    setup_wait = ["setup"] if plan.has(SETUP) else ([queued[SETUP]] if SETUP in queued else [])
    if plan.has(SETUP):
        submissions.append(Submission("setup", [Step(SETUP)], [f"--job-name=tlese-{name}-setup",
                                      f"--output={logs}/setup.%j.log"], str(folder / SCRIPT_NAMES[SETUP]),
                                      [str(folder / "experiment.yaml")], []))
    stage1_wait: dict[tuple[str, int], list[str]] = {}
    for step in plan.stage1:
        variable = _shell_name(step.key)
        submissions.append(Submission(variable, [step], [f"--job-name=tlese-{name}-{step.key}",
                                      f"--output={logs}/{step.key}.%j.log"], str(folder / SCRIPT_NAMES[STAGE1]),
                                      [step.arm, str(step.repeat)], setup_wait))
        stage1_wait[(step.arm, step.repeat)] = [variable]
    for (arm, repeat), folds in plan.cell_groups().items():
        waits = list(setup_wait)
        stage1 = Step(STAGE1, arm, repeat)
        if arm in plan.stage1_arms:
            waits += stage1_wait.get((arm, repeat)) or ([queued[stage1.key]] if stage1.key in queued else [])
        key = f"cells_{arm}_r{repeat}"
        steps = [Step(CELL, arm, repeat, fold) for fold in folds]
        submissions.append(Submission(_shell_name(key), steps, [
            f"--job-name=tlese-{name}-{key}", f"--array={_array_spec(folds, max_running)}",
            f"--output={logs}/cell_{arm}_r{repeat}_f%a.%A.log"], str(folder / SCRIPT_NAMES[CELL]),
            [arm, str(repeat)], waits))
    if plan.has(MERGE):
        waits = [submission.variable for submission in submissions]
        waits += sorted(set(queued.values()), key=_job_order)  # an old merge still running included
        submissions.append(Submission("merge", [Step(MERGE)], [f"--job-name=tlese-{name}-merge",
                                      f"--output={logs}/merge.%j.log"], str(folder / SCRIPT_NAMES[MERGE]), [],
                                      waits, dependency="afterany"))
    return submissions


def _job_order(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    return int(base) if base.isdigit() else 0, int(task) if task.isdigit() else -1


def _shell_word(word: str, variables: dict[str, str]) -> str:
    """`word` for a bash line: a dependency's `$var` kept, the submission's folders written as `$here`, `$logs`."""
    if word.startswith("--dependency="):
        return word
    for path, name in variables.items():
        if word.startswith(path) or f"={path}" in word:
            head, _, tail = word.partition(path)
            return f'{head}"${name}"{shlex.quote(tail) if tail else ""}'
    return shlex.quote(word)


def render_submit_script(plan: GridPlan, submissions: list[Submission], folder: Path) -> str:
    """submit.sh: the sbatch calls of a submission in order, each job id kept in a variable the later calls use."""
    logs = ClusterDir(plan.run_dir).logs
    variables = {str(folder): "here", str(logs): "logs"}
    lines = ["#!/bin/bash", f"# tlese grid: {folder.name} of run {plan.run_dir}", f"# {plan.summary()}.",
             "# `tlese submit` ran these sbatch calls itself and recorded the job ids in jobs.json; this file is their",
             "# record (it also works by hand).", "set -euo pipefail", f"here={shlex.quote(str(folder))}",
             f"logs={shlex.quote(str(logs))}", ""]
    for submission in submissions:
        words = [_shell_word(word, variables) for word in submission.argv()]
        script = words.index(_shell_word(submission.script, variables))
        head, options, tail = words[:4], words[4:script], words[script:]
        lines.append(f"{submission.variable}=$({' '.join(head)} \\")
        if options:
            lines.append(f"    {' '.join(options)} \\")
        lines.append(f"    {' '.join(tail)})")
        lines.append(f'echo "{submission.variable}: ${submission.variable}"')
    return "\n".join(lines) + "\n"


def write_submission(plan: GridPlan, resources: Resources, experiment_yaml: str, queued: dict[str, str],
                     cwd: Path | None = None) -> tuple[Path, list[Submission]]:
    """Write a new submission folder (scripts, submit.sh, experiment.yaml) and return it with its sbatch calls."""
    cwd = (cwd or Path.cwd()).resolve()
    folder = ClusterDir(plan.run_dir).new_submission()
    (folder / "experiment.yaml").write_text(experiment_yaml)
    for kind in {step.kind for step in plan.steps}:
        path = folder / SCRIPT_NAMES[kind]
        path.write_text(render_script(kind, plan.run_dir, resources, cwd))
        path.chmod(0o755)
    submissions = build_submissions(plan, folder, queued, resources.max_running)
    submit = folder / "submit.sh"
    submit.write_text(render_submit_script(plan, submissions, folder))
    submit.chmod(0o755)
    return folder, submissions


def require_slurm() -> None:
    missing = [name for name in ("sbatch", "squeue", "scontrol") if shutil.which(name) is None]
    if missing:
        raise SlurmError(f"{', '.join(missing)} not found on PATH: run `tlese submit --scheduler slurm` on a machine "
                         "of the cluster (a login node), or use --scheduler local")


def _sbatch(argv: list[str]) -> str:
    completed = subprocess.run(argv, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:2])} ... {argv[-3] if len(argv) > 3 else ''} failed "
                         f"({completed.returncode}): {completed.stderr.strip() or completed.stdout.strip()}")
    return completed.stdout.strip().split(";")[0]


def submit(plan: GridPlan, submissions: list[Submission], folder: Path, resources: Resources) -> dict[str, str]:
    """Run the sbatch calls in order and record the job ids (folder/jobs.json); returns step key -> job id.
    When one call fails, the jobs already queued by this submission are cancelled."""
    require_slurm()
    ids: dict[str, str] = {}
    steps: dict[str, dict] = {}
    logs = ClusterDir(plan.run_dir).logs
    try:
        for submission in submissions:
            job = _sbatch(submission.argv(ids))
            ids[submission.variable] = job
            for step in submission.steps:
                job_id = f"{job}_{step.fold}" if step.kind == CELL else job
                log = (logs / f"{step.key}.{job}.log")
                steps[step.key] = {"job_id": job_id, "log": str(log)}
    except SlurmError:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
        raise
    record = {"scheduler": "slurm", "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": resources.to_dict(), "jobs": ids, "steps": steps}
    (folder / "jobs.json").write_text(json.dumps(record, indent=2))
    return {key: value["job_id"] for key, value in steps.items()}


def cancel_pending(job_ids: list[str]) -> list[str]:
    """Cancel those of `job_ids` still waiting to start (a merge that a new submission's merge replaces); returns
    the ones cancelled. Running jobs are left alone."""
    try:
        queue = queue_states(job_ids)
    except SlurmError:  # harmless: the new merge waits for the old one, which then merges once more
        return []
    pending = [job for job, (state, _) in queue.items() if job in job_ids and state == "PENDING"]
    if pending:
        subprocess.run(["scancel", "--state=PENDING", *pending], capture_output=True, text=True)
    return pending


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id (`123`, or `123_4` for an array task) -> (SLURM state, reason) of those still queued or running."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    bases = sorted({job.split("_")[0] for job in job_ids})
    completed = subprocess.run(["squeue", "--array", "--noheader", "--format=%F|%K|%T|%r", f"--jobs={','.join(bases)}"],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        if "Invalid job id" in completed.stderr:  # none of them is known any more
            return {}
        message = completed.stderr.strip().splitlines()
        raise SlurmError(f"squeue failed ({completed.returncode}): {message[-1] if message else 'no message'}")
    states = {}
    for line in completed.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        base, task, state, reason = parts
        key = base if task in ("N/A", "") else f"{base}_{task}"
        states[key] = (state, "" if reason == "None" else reason)
    return states
