"""The plan, the generated scripts and the status logic, without a cluster (fast)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tlese.cluster.plan import CELL, MERGE, SETUP, STAGE1, Step, plan_grid, remaining
from tlese.cluster.records import ClusterDir
from tlese.cluster.slurm import Resources, write_submission
from tlese.cluster.status import DONE, FAILED, MISSING, RUNNING, format_status, grid_status
from tlese.train.config import dump_experiment, load_experiment

DOCS = Path(__file__).resolve().parents[2] / "docs"
TRANSFERS = ["double", "imagenet", "cxr", "scratch", "double"]


def experiment(tmp_path: Path, arms: int = 5, repeats: int = 3, folds: int = 6):
    """A 5 x 3 x 6 experiment (roots need not exist: nothing is read)."""
    base = {"name": "grid", "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
            "folds": folds, "repeats": repeats,
            "target": {"adapter": "cmmd", "root": str(tmp_path / "cmmd"), "task": "cmmd_subtype4"},
            "cxr": {"adapter": "darkcovidnet", "root": str(tmp_path / "cxr"), "task": "cxr_covid3"},
            "arms": [{"name": f"arm{index}_{transfer}", "model": "lite0_plain", "transfer": transfer}
                     for index, transfer in enumerate(TRANSFERS[:arms])]}
    return load_experiment(base=base)


def test_plan_has_setup_stage1_per_arm_and_seed_cells_and_merge(tmp_path):
    plan = plan_grid(experiment(tmp_path))
    kinds = [step.kind for step in plan.steps]
    assert kinds.count(SETUP) == 1 and kinds[0] == SETUP and kinds[-1] == MERGE and kinds.count(MERGE) == 1
    assert plan.stage1_arms == ["arm0_double", "arm2_cxr", "arm4_double"]  # only arms with a chest X-ray stage
    assert len(plan.stage1) == 3 * 3 and len(plan.cells) == 5 * 3 * 6
    assert plan.stage1_of(Step(CELL, "arm2_cxr", 2, 4)) == Step(STAGE1, "arm2_cxr", 2)
    assert plan.stage1_of(Step(CELL, "arm3_scratch", 0, 0)) is None
    assert len({step.key for step in plan.steps}) == len(plan.steps)


def test_remaining_keeps_failed_and_missing_cells_their_stage1_and_a_merge(tmp_path):
    plan = plan_grid(experiment(tmp_path, arms=2, repeats=1, folds=3))  # arm0_double (stage 1), arm1_imagenet
    states = {step.key: DONE for step in plan.steps}
    states.update({"cell_arm0_double_r0_f1": FAILED, "cell_arm1_imagenet_r0_f2": MISSING,
                   "cell_arm1_imagenet_r0_f0": RUNNING})
    todo = remaining(plan, states)
    assert [step.key for step in todo.steps] == ["cell_arm0_double_r0_f1", "cell_arm1_imagenet_r0_f2", MERGE]
    states["stage1_arm0_double_r0"] = MISSING  # its checkpoint deleted: trained again before its cell
    assert [step.key for step in remaining(plan, states).steps][:2] == ["stage1_arm0_double_r0",
                                                                       "cell_arm0_double_r0_f1"]
    assert remaining(plan, {step.key: DONE for step in plan.steps}).steps == []


def test_refuses_arm_names_unfit_for_job_files(tmp_path):
    bad = experiment(tmp_path, arms=1)
    bad.arms[0].name = "my arm"
    with pytest.raises(ValueError, match="my arm"):
        plan_grid(bad)


def test_scripts_are_valid_bash_with_dependencies_arrays_and_gpu_settings(tmp_path):
    plan = plan_grid(experiment(tmp_path, arms=2, repeats=2, folds=4))
    resources = Resources(partition="gpu", account="lab", gpus_per_job=2, cpus_per_job=8, mem="32G",
                          time="04:00:00", max_running=2, signal_seconds=600, sbatch_options=["--qos=long"])
    folder, submissions = write_submission(plan, resources, "name: grid\n", queued={}, cwd=tmp_path)
    for script in [*folder.glob("*.sbatch"), folder / "submit.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)  # syntax
    cells = (folder / "cells.sbatch").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --gres=gpu:2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
                 "#SBATCH --time=04:00:00", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --qos=long",
                 "--set target_recipe.strategy=ddp", "--set target_recipe.devices=2", "trap requeue USR1"):
        assert line in cells, line
    setup = (folder / "setup.sbatch").read_text()
    assert "--gres" not in setup and "#SBATCH --ntasks-per-node=1" in setup  # CPU only
    calls = {submission.variable: submission.argv() for submission in submissions}
    assert list(calls) == ["setup", "stage1_arm0_double_r0", "stage1_arm0_double_r1", "cells_arm0_double_r0",
                           "cells_arm0_double_r1", "cells_arm1_imagenet_r0", "cells_arm1_imagenet_r1", "merge"]
    assert "--array=0-3%2" in calls["cells_arm0_double_r1"]
    assert "--dependency=afterok:$setup:$stage1_arm0_double_r1" in calls["cells_arm0_double_r1"]
    assert "--dependency=afterok:$setup" in calls["cells_arm1_imagenet_r0"]
    assert "--kill-on-invalid-dep=yes" in calls["cells_arm1_imagenet_r0"]
    merge_dependency = next(word for word in calls["merge"] if word.startswith("--dependency="))
    assert merge_dependency.startswith("--dependency=afterany:$setup:") and merge_dependency.count("$") == 7


def test_resubmission_waits_for_what_is_still_queued(tmp_path):
    plan = plan_grid(experiment(tmp_path, arms=1, repeats=1, folds=3))  # arm0_double
    todo = remaining(plan, {SETUP: DONE, "stage1_arm0_double_r0": RUNNING, "cell_arm0_double_r0_f0": DONE})
    _, submissions = write_submission(todo, Resources(), "", queued={"stage1_arm0_double_r0": "41"}, cwd=tmp_path)
    calls = {submission.variable: submission.argv({}) for submission in submissions}
    assert list(calls) == ["cells_arm0_double_r0", "merge"]
    assert "--array=1-2" in calls["cells_arm0_double_r0"]
    assert "--dependency=afterok:41" in calls["cells_arm0_double_r0"]  # the stage 1 queued earlier


def _write_run(tmp_path: Path) -> tuple[Path, ClusterDir]:
    run = tmp_path / "runs" / "grid"
    run.mkdir(parents=True)
    dump_experiment(experiment(tmp_path, arms=1, repeats=1, folds=2), run / "config.yaml")
    return run, ClusterDir(run)


def test_status_reads_exit_codes_logs_kills_and_cancelled_jobs(tmp_path):
    run, records = _write_run(tmp_path)
    folder = records.new_submission()
    logs = {key: records.logs / f"{key}.log" for key in ("setup", "stage1_arm0_double_r0",
                                                         "cell_arm0_double_r0_f0", "cell_arm0_double_r0_f1")}
    steps = {key: {"job_id": job, "log": str(logs.get(key, records.logs / "merge.log"))}
             for key, job in (("setup", "7"), ("stage1_arm0_double_r0", "8"), ("cell_arm0_double_r0_f0", "9_0"),
                              ("cell_arm0_double_r0_f1", "9_1"), ("merge", "10"))}
    (folder / "jobs.json").write_text(json.dumps({"scheduler": "slurm", "steps": steps}))
    lines = {"setup": ["start 2026-01-01T00:00:00Z 7 0 node1", "end 2026-01-01T00:01:00Z 7 0 2"],
             "stage1_arm0_double_r0": ["start 2026-01-01T00:00:00Z 8 0 node1"],
             "cell_arm0_double_r0_f0": ["start 2026-01-01T00:00:00Z 9_0 0 node1", "end 2026-01-01T00:00:09Z 9_0"]}
    for key, content in lines.items():
        records.state_file(key).write_text("\n".join(content) + "\n")
    logs["setup"].write_text("INFO preparing\n" + "".join(f"line {index}\n" for index in range(20))
                             + "tlese setup-run: error: target.root: /x does not exist\n")
    status = grid_status(run, log_lines=3, query_queue=False)
    setup = status.steps["setup"]
    assert (setup.state, setup.exit_code, setup.job_id) == (FAILED, 2, "7")
    assert setup.log_tail == ["line 18", "line 19", "tlese setup-run: error: target.root: /x does not exist"]
    stage1 = status.steps["stage1_arm0_double_r0"]
    assert stage1.state == FAILED and stage1.exit_code is None and "without an exit record" in stage1.detail
    # a line cut by a kill is ignored: this attempt has no end either
    assert status.steps["cell_arm0_double_r0_f0"].state == FAILED
    cancelled = status.steps["cell_arm0_double_r0_f1"]
    assert cancelled.state == MISSING and "never started" in cancelled.detail
    text = format_status(status)
    assert "failed (2)" in text and "failed (killed)" in text and "target.root: /x does not exist" in text
    assert f"tlese submit --resume {run}" in text


def test_status_done_comes_from_the_run_folder_and_local_jobs_from_their_process(tmp_path):
    run, records = _write_run(tmp_path)
    fold = run / "arm0_double" / "fold_1"
    fold.mkdir(parents=True)
    (fold / "fold_info.json").write_text("{}")
    (fold / "predictions_images.csv").write_text("fold\n1\n")
    folder = records.new_submission()
    job = f"local:{socket.gethostname()}:{os.getpid()}"  # this very process: alive
    (folder / "jobs.json").write_text(json.dumps({"scheduler": "local", "steps": {
        "cell_arm0_double_r0_f0": {"job_id": job, "log": str(records.logs / "c.log")}}}))
    records.state_file("cell_arm0_double_r0_f0").write_text(f"start 2026-01-01T00:00:00Z {job} 0 here\n")
    status = grid_status(run, query_queue=False)
    assert status.steps["cell_arm0_double_r0_f1"].state == DONE
    assert status.steps["cell_arm0_double_r0_f0"].state == RUNNING
    assert status.steps["setup"].state == MISSING and status.steps["setup"].detail == "never submitted"


def test_docs_dry_run_is_a_5_x_3_x_6_grid_with_one_gpu_per_job():
    text = (DOCS / "cluster_dry_run.txt").read_text()
    submit_sh = text.split("==> ")[1]
    assert submit_sh.count("cells.sbatch") == 5 * 3 and submit_sh.count("--array=0-5") == 5 * 3
    assert "#SBATCH --gres=gpu:1" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "5 arm(s) x 3 repeat(s) x 6 folds: 90 cell(s)" in text
