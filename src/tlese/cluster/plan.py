"""The experiment grid as steps: one plan that both schedulers run (SLURM jobs, or in this process).

A run's grid is arms x repeats x folds **cells**. Before the cells: one `setup` step (settle the run's config, prepare
the data once into the cache, draw every repeat's folds: CPU only, so no GPU waits while DICOMs are decoded) and one
`stage1` step per arm that uses the chest X-ray stage and per repeat (its training seed). After them: one `merge`.
A cell waits for setup and for its own stage 1 only.

The plan is plain data: `Step`s with a file-safe key, and what each waits for. `remaining()` takes the grid's
status and keeps the steps still to do, which is what `tlese submit --resume` sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SETUP, STAGE1, CELL, MERGE = "setup", "stage1", "cell", "merge"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True, order=True)
class Step:
    """One unit of work: `setup`, `stage1` (arm, repeat), `cell` (arm, repeat, fold) or `merge`."""

    kind: str
    arm: str = ""
    repeat: int = -1
    fold: int = -1

    @property
    def key(self) -> str:
        """A name fit for files and job names, e.g. `cell_tlese_double_r0_f3`."""
        if self.kind == CELL:
            return f"cell_{self.arm}_r{self.repeat}_f{self.fold}"
        if self.kind == STAGE1:
            return f"stage1_{self.arm}_r{self.repeat}"
        return self.kind

    def describe(self) -> str:
        if self.kind == CELL:
            return f"{self.arm} repeat {self.repeat} fold {self.fold}"
        if self.kind == STAGE1:
            return f"{self.arm} repeat {self.repeat} stage 1"
        return self.kind


@dataclass
class GridPlan:
    """The steps of one run's grid (all of them, or those `remaining`), in the order they may start."""

    run_dir: Path
    arms: list[str]
    repeats: int
    folds: int
    stage1_arms: list[str]  # arms with a chest X-ray stage 1
    steps: list[Step] = field(default_factory=list)

    @property
    def cells(self) -> list[Step]:
        return [step for step in self.steps if step.kind == CELL]

    @property
    def stage1(self) -> list[Step]:
        return [step for step in self.steps if step.kind == STAGE1]

    def has(self, kind: str) -> bool:
        return any(step.kind == kind for step in self.steps)

    def stage1_of(self, step: Step) -> Step | None:
        """The stage-1 step a cell waits for (None: its arm has no stage 1)."""
        return Step(STAGE1, step.arm, step.repeat) if step.arm in self.stage1_arms else None

    def grid(self) -> list[Step]:
        """Every cell of the run, done or not, in grid order (arm, repeat, fold)."""
        return [Step(CELL, arm, repeat, fold) for arm in self.arms for repeat in range(self.repeats)
                for fold in range(self.folds)]

    def cell_groups(self) -> dict[tuple[str, int], list[int]]:
        """Folds to run per (arm, repeat): one SLURM job array each."""
        groups: dict[tuple[str, int], list[int]] = {}
        for step in self.cells:
            groups.setdefault((step.arm, step.repeat), []).append(step.fold)
        return groups

    def summary(self) -> str:
        counts = {kind: sum(step.kind == kind for step in self.steps) for kind in (SETUP, STAGE1, CELL, MERGE)}
        return (f"{len(self.arms)} arm(s) x {self.repeats} repeat(s) x {self.folds} folds: {counts[CELL]} cell(s), "
                f"{counts[STAGE1]} stage-1 step(s), {'a' if counts[SETUP] else 'no'} setup step, "
                f"{'a' if counts[MERGE] else 'no'} merge")


def plan_grid(experiment, arms: list[str] | None = None) -> GridPlan:
    """The whole grid of `experiment` (or of the chosen arms): setup, stage 1 per (arm, repeat), cells, merge."""
    from tlese.train.config import TRANSFER
    from tlese.train.rundir import RESERVED_ARM_NAMES, RunDir

    chosen = [experiment.arm(name) for name in arms] if arms else list(experiment.arms)
    for arm in chosen:
        if not _SAFE_NAME.fullmatch(arm.name) or arm.name in RESERVED_ARM_NAMES:
            raise ValueError(f"arm name {arm.name!r}: a cluster job needs letters, digits, '_', '.' or '-' (and not "
                             f"{sorted(RESERVED_ARM_NAMES)}); rename the arm")
    names = [arm.name for arm in chosen]
    plan = GridPlan(run_dir=RunDir.of(experiment).path.resolve(), arms=names, repeats=experiment.repeats,
                    folds=experiment.folds, stage1_arms=[arm.name for arm in chosen if TRANSFER[arm.transfer].cxr])
    plan.steps = [Step(SETUP),
                  *(Step(STAGE1, arm, repeat) for arm in plan.stage1_arms for repeat in range(plan.repeats)),
                  *plan.grid(), Step(MERGE)]
    return plan


def remaining(plan: GridPlan, status: dict[str, str]) -> GridPlan:
    """The plan's steps still to do, given each step key's state (done | running | pending | failed | missing).

    Cells not done and not queued are kept; a stage 1 is kept when a kept cell needs it and it is neither done nor
    queued; setup when it is not done; merge whenever anything is kept (or the merge itself is not done)."""
    queued = {"running", "pending"}
    cells = [step for step in plan.cells if status.get(step.key, "missing") not in {"done", *queued}]
    needed_stage1 = {plan.stage1_of(step) for step in cells} - {None}
    stage1 = [step for step in plan.stage1 if step in needed_stage1
              and status.get(step.key, "missing") not in {"done", *queued}]
    setup = [Step(SETUP)] if status.get(SETUP, "missing") not in {"done", *queued} else []
    todo = [*setup, *stage1, *cells]
    merge = [Step(MERGE)] if todo or status.get(MERGE, "missing") not in {"done", *queued} else []
    return GridPlan(plan.run_dir, plan.arms, plan.repeats, plan.folds, plan.stage1_arms, [*todo, *merge])
