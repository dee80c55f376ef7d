"""The steps of a grid that `tlese cv` does not run on its own: setup and stage 1 alone.

A cell is `tlese cv --arm A --repeat r --fold k` and the merge `tlese merge RUN`; these two complete the plan. Both
call the training library's own functions, so a step run by a SLURM job, by the local scheduler or by hand is the
same computation with the same records and checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def setup_step(experiment) -> Path:
    """Settle the run folder (its config; refuse changed settings), prepare the target data (and the chest X-rays
    when an arm uses them) into the cache and draw the folds of every repeat. Returns the run folder."""
    from tlese.train.cv import check_experiment, engine_uses_cxr, repeat_folds, setup_run
    from tlese.train.data import prepare
    from tlese.train.rundir import RunDir

    chosen = check_experiment(experiment)
    run_dir, data = setup_run(experiment)
    run = RunDir(run_dir)
    for repeat in range(experiment.repeats):
        repeat_folds(experiment, run, data, repeat)
    if any(engine_uses_cxr(arm) for arm in chosen):
        prepare(experiment.cxr, experiment)
    run.add_notes(data.notes)  # the folds' warnings (a class missing from a fold), as `tlese cv` records them
    log.info("%s: config settled, data prepared, folds of %d repeat(s) drawn", run_dir, experiment.repeats)
    return run_dir


def stage1_step(experiment, arm_name: str, repeat: int = 0) -> Path:
    """Train (or reuse, when finished from the same settings) stage 1 of one arm for one repeat's seed; returns its
    selected checkpoint. The run folder must be set up (`setup_step`); cells of that (arm, repeat) then reuse it."""
    from tlese.train.cv import check_experiment, engine_uses_cxr
    from tlese.train.data import prepare
    from tlese.train.rundir import RunDir
    from tlese.train.stages import run_cxr_stage

    (arm,) = check_experiment(experiment, [arm_name])
    if not engine_uses_cxr(arm):
        raise ValueError(f"arm {arm_name}: transfer {arm.transfer!r} has no chest X-ray stage 1")
    run = RunDir.of(experiment)
    run.require()
    repeated = experiment.for_repeat(repeat)
    checkpoint, _ = run_cxr_stage(arm, repeated, run.arm(arm.name, repeat), data=prepare(experiment.cxr, experiment))
    return checkpoint
