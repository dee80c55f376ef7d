"""The experiment grid on a scheduler: arms x repeats x folds cells, with setup, stage 1 and merge steps.

`plan_grid` turns an experiment into steps; `submit_grid` hands the steps not done yet to SLURM (sbatch scripts with
dependencies, written into the run folder) or runs them in this process; `grid_status` reads what is done, queued,
failed or missing. See docs/cluster.md.
"""

from tlese.cluster.plan import GridPlan, Step, plan_grid, remaining
from tlese.cluster.slurm import Resources, SlurmError
from tlese.cluster.status import GridStatus, StepStatus, format_status, grid_status
from tlese.cluster.submit import SubmitResult, submit_grid

__all__ = ["GridPlan", "GridStatus", "Resources", "SlurmError", "Step", "StepStatus", "SubmitResult",
           "format_status", "grid_status", "plan_grid", "remaining", "submit_grid"]
