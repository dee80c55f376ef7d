"""`tlese submit`, `status`, and the two grid steps `tlese cv` does not run alone: `setup-run` and `stage1`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    submit = subparsers.add_parser(
        "submit", help="run an experiment's grid (arms x repeats x folds) on SLURM or in this process",
        description="Plan the grid: a setup job (config, prepared data, folds), one stage-1 job per arm with a chest "
        "X-ray stage and repeat, a job array of folds per (arm, repeat) after its stage 1, and a merge job after "
        "everything. Cells already done, and steps already queued, are left out: submitting again, or with --resume, "
        "runs only what is failed or missing. The job scripts are written into RUN/cluster/submission_<N>/.")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("config", nargs="?", help="experiment YAML")
    source.add_argument("--resume", metavar="RUN_DIR", help="resubmit the failed or missing steps of a run folder")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), as for `tlese cv`")
    submit.add_argument("--arm", action="append", default=None, help="only this arm (repeatable)")
    submit.add_argument("--scheduler", choices=("local", "slurm"), default="local",
                        help="slurm: sbatch jobs; local (default): the same steps in this process")
    submit.add_argument("--dry-run", action="store_true", help="write and print the job scripts, submit nothing")
    slurm = submit.add_argument_group("SLURM resources per training job (default: the run's last submission's)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--gpus-per-job", type=int, default=None, metavar="N",
                       help="GPUs per stage-1 or cell job (default 0); N > 1 trains with DDP, one task per GPU")
    slurm.add_argument("--cpus-per-job", type=int, default=None, metavar="C",
                       help="CPUs per task (also OMP_NUM_THREADS; data loader workers come from the recipe)")
    slurm.add_argument("--mem", default=None, metavar="M", help="memory per training job, e.g. 32G")
    slurm.add_argument("--time", default=None, metavar="HH:MM:SS", help="time limit of every job")
    slurm.add_argument("--max-running", type=int, default=None, metavar="K",
                       help="at most K cells of one (arm, repeat) at once (the job array's %%K)")
    slurm.add_argument("--signal-seconds", type=int, default=None, metavar="S",
                       help="requeue S seconds before the time limit (default 300)")
    slurm.add_argument("--sbatch-option", dest="sbatch_options", action="append", default=None, metavar="OPT",
                       help="any other sbatch option for every job, e.g. --sbatch-option=--qos=long (repeatable)")
    submit.set_defaults(func=cmd_submit)

    status = subparsers.add_parser("status", help="a run's grid: done, running, failed (with log lines), missing")
    status.add_argument("run_dir", help="the run folder")
    status.add_argument("--log-lines", type=int, default=10, metavar="N", help="log lines per failed step (10)")
    status.add_argument("--json", action="store_true", help="one JSON object per step instead of the table")
    status.set_defaults(func=cmd_status)

    setup = subparsers.add_parser("setup-run", help="settle a run folder: config, prepared data, every repeat's folds "
                                  "(the grid's first step; no training)")
    setup.add_argument("--config", required=True, help="experiment YAML")
    setup.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    setup.set_defaults(func=cmd_setup_run)

    stage1 = subparsers.add_parser("stage1", help="train stage 1 (chest X-ray) of one arm alone, for one repeat")
    stage1.add_argument("--config", required=True, help="experiment YAML (the run's config.yaml)")
    stage1.add_argument("--arm", required=True)
    stage1.add_argument("--repeat", type=int, default=0)
    stage1.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    stage1.set_defaults(func=cmd_stage1)


RESOURCE_FLAGS = ("partition", "account", "gpus_per_job", "cpus_per_job", "mem", "time", "max_running",
                  "signal_seconds", "sbatch_options")


def cmd_submit(args: argparse.Namespace) -> int:
    from tlese.cluster.slurm import SlurmError
    from tlese.cluster.submit import submit_grid
    from tlese.train.commands import configure_logging

    if args.scheduler == "local":
        configure_logging()
    resources = {name: getattr(args, name) for name in RESOURCE_FLAGS if getattr(args, name) is not None}
    try:
        result = submit_grid(args.config, args.overrides, resume=args.resume, scheduler=args.scheduler,
                             resources=resources, arms=args.arm, dry_run=args.dry_run)
    except SlurmError as error:
        print(f"tlese submit: error: {error}", file=sys.stderr)
        return 2
    if result.folder is None and not result.dry_run_text:
        print(f"{result.plan.run_dir}: nothing to do (every step is done or queued)")
        return 0
    if result.dry_run_text:
        print(result.dry_run_text)
        print(f"\ndry run: {result.plan.summary()}; nothing submitted")
        return 0
    print(f"{result.plan.run_dir}: {result.plan.summary()}")
    if args.scheduler == "slurm":
        print(f"submitted {len(set(result.job_ids.values()))} job(s); scripts and job ids in {result.folder}")
        print(f"follow with: tlese status {result.plan.run_dir}")
        return 0
    failed = [key for key, code in result.exit_codes.items() if code]
    if failed:
        print(f"failed: {', '.join(failed)}; `tlese status {result.plan.run_dir}` shows why, then "
              f"`tlese submit --resume {result.plan.run_dir}`", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tlese.cluster.status import format_status, grid_status

    status = grid_status(args.run_dir, log_lines=args.log_lines)
    if args.json:
        for entry in status.steps.values():
            print(json.dumps({"step": entry.step.key, "kind": entry.step.kind, "arm": entry.step.arm or None,
                              "repeat": entry.step.repeat if entry.step.repeat >= 0 else None,
                              "fold": entry.step.fold if entry.step.fold >= 0 else None, "state": entry.state,
                              "job_id": entry.job_id or None, "exit_code": entry.exit_code, "detail": entry.detail,
                              "log": str(entry.log) if entry.log else None, "log_tail": entry.log_tail}))
    else:
        print(format_status(status))
    return 0


def cmd_setup_run(args: argparse.Namespace) -> int:
    from tlese.cluster.steps import setup_step
    from tlese.train.commands import configure_logging
    from tlese.train.config import load_experiment

    configure_logging()
    print(f"run folder: {setup_step(load_experiment(args.config, args.overrides))}")
    return 0


def cmd_stage1(args: argparse.Namespace) -> int:
    from tlese.cluster.steps import stage1_step
    from tlese.train.commands import configure_logging
    from tlese.train.config import load_experiment

    configure_logging()
    print(f"stage 1 checkpoint: {stage1_step(load_experiment(args.config, args.overrides), args.arm, args.repeat)}")
    return 0
