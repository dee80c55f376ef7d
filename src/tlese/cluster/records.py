"""What the schedulers leave in the run folder: `<run>/cluster/`.

    submission_<NNN>/   one per `tlese submit`: the job scripts, submit.sh (the sbatch commands, in order),
                        experiment.yaml (what the setup step reads), jobs.json (step key -> job id and log file)
    logs/               one log per job (a requeued job appends to its own)
    state/<step>.txt    written by the job itself, one line per event: `start|end|signal <UTC time> <job id>
                        <attempt> <host or exit code>`

SLURM forgets a job minutes after it ends and clusters without an accounting database (`sacct`) are common, so a
job's outcome is read from the line it wrote, and whether it is queued from `squeue`; the results themselves (a fold's
predictions, stage 1's checkpoint) are read from the run folder, which alone decides "done".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateEvent:
    """One line of a step's state file."""

    event: str  # start | end | signal
    time: str
    job_id: str
    attempt: int
    detail: str  # host (start), exit code (end), what happened (signal)

    @classmethod
    def parse(cls, line: str) -> StateEvent | None:
        parts = line.split(maxsplit=4)
        if len(parts) < 4 or parts[0] not in ("start", "end", "signal"):
            return None  # a line cut by a kill
        try:
            attempt = int(parts[3])
        except ValueError:
            return None
        return cls(parts[0], parts[1], parts[2], attempt, parts[4].strip() if len(parts) > 4 else "")


@dataclass(frozen=True)
class ClusterDir:
    """The scheduler records of one run folder."""

    run_dir: Path

    @property
    def path(self) -> Path:
        from tlese.train.rundir import RunDir

        return RunDir(Path(self.run_dir)).cluster_dir

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def states(self) -> Path:
        return self.path / "state"

    def state_file(self, step_key: str) -> Path:
        return self.states / f"{step_key}.txt"

    def submissions(self) -> list[Path]:
        return sorted(path for path in self.path.glob("submission_*") if path.is_dir())

    def new_submission(self) -> Path:
        """A fresh `submission_<NNN>` folder (created)."""
        existing = [int(path.name.removeprefix("submission_")) for path in self.submissions()
                    if path.name.removeprefix("submission_").isdigit()]
        folder = self.path / f"submission_{max(existing, default=0) + 1:03d}"
        folder.mkdir(parents=True)
        for sub in (self.logs, self.states):
            sub.mkdir(parents=True, exist_ok=True)
        return folder

    def jobs(self) -> dict[str, dict]:
        """Step key -> the latest job submitted for it ({"job_id", "log", "scheduler", "submission"})."""
        latest: dict[str, dict] = {}
        for folder in self.submissions():
            record = folder / "jobs.json"
            if not record.is_file():  # a --dry-run, or a submission that failed before any job was queued
                continue
            content = json.loads(record.read_text())
            for key, job in content.get("steps", {}).items():
                latest[key] = {**job, "scheduler": content.get("scheduler", "slurm"), "submission": folder.name}
        return latest

    def last_settings(self) -> dict:
        """The resources of the latest submission that queued jobs (defaults for `submit --resume`)."""
        for folder in reversed(self.submissions()):
            record = folder / "jobs.json"
            if record.is_file():
                return json.loads(record.read_text()).get("settings", {})
        return {}

    def events(self, step_key: str) -> list[StateEvent]:
        path = self.state_file(step_key)
        if not path.is_file():
            return []
        return [event for line in path.read_text().splitlines() if (event := StateEvent.parse(line))]


def tail(path: Path | None, lines: int) -> list[str]:
    """The last `lines` non-empty lines of a log (none when it does not exist)."""
    if path is None or not Path(path).is_file() or lines <= 0:
        return []
    text = Path(path).read_text(errors="replace").splitlines()
    return [line for line in text if line.strip()][-lines:]
