"""The local scheduler: the same plan as on SLURM, its steps run one after the other in this process.

Each step writes the same state lines and a log as a SLURM job does, so `tlese status` and `tlese submit --resume`
read a local grid the same way. A failed step does not stop the grid: the cells that do not need it still run (a
failed stage 1 skips its own cells, a failed setup everything), and the merge names what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path

from tlese.cluster.plan import CELL, MERGE, SETUP, STAGE1, GridPlan, Step
from tlese.cluster.records import ClusterDir

log = logging.getLogger(__name__)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _run_step(step: Step, plan: GridPlan, folder: Path) -> None:
    from tlese.cluster.steps import setup_step, stage1_step
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_cv
    from tlese.train.merge import merge_run

    config = plan.run_dir / "config.yaml"
    if step.kind == SETUP:
        setup_step(load_experiment(folder / "experiment.yaml"))
    elif step.kind == STAGE1:
        stage1_step(load_experiment(config), step.arm, step.repeat)
    elif step.kind == CELL:
        run_cv(load_experiment(config), arms=[step.arm], fold=step.fold, repeat=step.repeat)
    else:
        from tlese.cluster.status import format_status, grid_status

        print(format_status(grid_status(plan.run_dir, query_queue=False)))
        paths = merge_run(plan.run_dir)
        print(f"report: {paths['html']}")


def run_local(plan: GridPlan, folder: Path) -> dict[str, int]:
    """Run the plan's steps in order in this process; returns step key -> exit code (0 ok, 1 failed) of the steps
    that ran. `folder`: the submission folder (its experiment.yaml is what setup reads)."""
    records = ClusterDir(plan.run_dir)
    job_id = f"local:{socket.gethostname()}:{os.getpid()}"
    steps = {step.key: {"job_id": job_id, "log": str(records.logs / f"{step.key}.local.log")} for step in plan.steps}
    (folder / "jobs.json").write_text(json.dumps({"scheduler": "local", "submitted": _now(), "settings": {},
                                                 "steps": steps}, indent=2))
    codes: dict[str, int] = {}
    failed: set[Step] = set()
    for step in plan.steps:
        blocked = (failed & {Step(SETUP)}) or (step.kind == CELL and plan.stage1_of(step) in failed)
        if blocked and step.kind != MERGE:
            log.warning("%s: skipped, a step it needs failed", step.describe())
            continue
        codes[step.key] = _record(step, plan, folder, records, job_id, Path(steps[step.key]["log"]))
        if codes[step.key]:
            failed.add(step)
    return codes


def _record(step: Step, plan: GridPlan, folder: Path, records: ClusterDir, job_id: str, log_path: Path) -> int:
    """Run one step between its state lines, its log (tlese's log records and the error) in `log_path`."""
    state = records.state_file(step.key)
    attempt = sum(event.event == "start" for event in records.events(step.key))
    handler = logging.FileHandler(log_path, mode="a")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    with state.open("a") as handle:
        handle.write(f"start {_now()} {job_id} {attempt} {socket.gethostname()}\n")
    code = 0
    try:
        log.info("== %s, %s, attempt %d", step.key, job_id, attempt)
        _run_step(step, plan, folder)
    except Exception as error:  # noqa: BLE001  (recorded, and the grid goes on; Ctrl-C still stops it)
        code = 1
        with log_path.open("a") as handle:
            handle.write("".join(traceback.format_exception(error)[-3:]))
            handle.write(f"tlese: error: {error}\n")
        log.error("%s failed: %s", step.describe(), error)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    with state.open("a") as handle:
        handle.write(f"end {_now()} {job_id} {attempt} {code}\n")
    return code
