"""The run folder: its layout, the record of what made each stage and fold, and the checks before anything is reused.

Layout (`<output_dir>/<name>/`):
    config.yaml, environment.json, notes.json, data_summary.csv, folds_seed<seed>_k<k>.csv
    <arm>/stage1_cxr/     made_from.json, start.json, stage_summary.json, done.json, checkpoints/, logs/
    <arm>/fold_<k>/       made_from.json, split.csv, fold_info.json, done.json, checkpoints/, logs/,
                          predictions_images.csv, predictions_breasts.csv
    <arm>/repeat_<i>/     stage1_cxr/ and fold_<k>/ of repeat i >= 1 of a repeated CV (repeat 0 is the plain layout
                          above, so a single CV is repeat 0 of a repeated one); folds_seed<repeat seed>_k<k>.csv and
                          data_summary_repeat<i>.csv beside the config

Every other module asks this one for a path, never spells it. A stage or fold records, before it trains, what it is made
from (`made_from.json`: the arm's resolved settings, the data and folds hashes, the stage-1 fingerprint, the code
version); reusing it with other settings is refused with the keys that changed (or, with `force`, it is retrained).
A finished fold's record (`fold_info.json`) carries the model spec it trained (`tlese.models.spec.ModelSpec`).

Records are written atomically (`save_json`, `save_text`): a full disk or a kill leaves the previous file or none,
never a truncated one, and the error is one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tlese.files import sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic
from tlese.models.spec import ModelSpec, ModelSpecError

MADE_FROM = "made_from.json"
DONE = "done.json"
PREDICTIONS_IMAGES = "predictions_images.csv"
PREDICTIONS_BREASTS = "predictions_breasts.csv"

# Settings that change how a job runs, not what it computes: per-fold jobs may differ in them.
EXECUTION_KEYS = frozenset({"progress_bar", "num_workers", "devices", "num_nodes", "strategy", "accelerator"})
# Top-level keys that say where things are or how much to report, not what is trained.
# `repeats` says how many repeats exist, not what any of them computes (each repeat records its own seed).
RUN_ONLY_KEYS = frozenset({"name", "output_dir", "cache_dir", "prepare_workers", "bootstrap", "folds_file", "arms",
                           "prepare_max_skipped", "repeats"})
# Repeat i of a repeated CV draws its folds and trains with seed + REPEAT_SEED_STEP * i: far enough apart that the
# per-fold training seeds (seed + fold) of two repeats never coincide.
REPEAT_SEED_STEP = 1000


def repeat_seed(seed: int, repeat: int) -> int:
    """The folds and training seed of repeat `repeat` of a run with base `seed` (repeat 0: the seed itself)."""
    return int(seed) + REPEAT_SEED_STEP * int(repeat)


class StaleRunError(ValueError):
    """A run folder holds results made from other settings or data than the ones asked for now."""


def fingerprint(value: Any) -> str:
    """Short SHA-256 of a JSON-able value (sorted keys): equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values (for the refusal message)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            found += differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if recorded == current else [f"{prefix.rstrip('.')}: {recorded!r} -> {current!r}"]


@contextmanager
def naming_failed_writes(path: str | Path) -> Iterator[None]:
    """A failed write (full disk, quota, read-only folder) raised as OSError naming `path` (its `filename`), with
    the errno kept: the atomic writers have left the previous version of the file (or none), never a truncated one."""
    try:
        yield
    except OSError as error:
        # OSError(errno, ...) is the errno's own subclass (ENOENT: FileNotFoundError), so callers can still tell.
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def save_json(path: str | Path, value: Any) -> None:
    """Write a JSON record atomically (see `naming_failed_writes`)."""
    with naming_failed_writes(path):
        write_json_atomic(path, value)


def save_text(path: str | Path, text: str) -> None:
    with naming_failed_writes(path):
        write_text_atomic(path, text)


def save_bytes(path: str | Path, data: bytes) -> None:
    with naming_failed_writes(path):
        write_bytes_atomic(path, data)


def assert_no_leakage(split: pd.DataFrame, where: str) -> None:
    """No patient of the test fold may be in the training or validation data of that fold."""
    test = set(split.loc[split["role"] == "test", "patient_id"])
    seen = set(split.loc[split["role"] != "test", "patient_id"])
    leaked = test & seen
    if leaked:
        raise AssertionError(f"{where}: {len(leaked)} test patient(s) also in training/validation, "
                             f"e.g. {sorted(leaked)[:3]}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: unreadable record ({error}); delete the folder holding it to redo that step") \
            from None


@dataclass(frozen=True)
class StageDir:
    """One trained stage (stage 1 of an arm, or one fold's stage 2)."""

    path: Path

    @property
    def made_from_file(self) -> Path:
        return self.path / MADE_FROM

    @property
    def done_file(self) -> Path:
        return self.path / DONE

    @property
    def start_file(self) -> Path:
        """How the first attempt started (ImageNet loaded or not), kept for the attempts that resume it."""
        return self.path / "start.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def is_done(self) -> bool:
        return self.done_file.is_file()

    def done(self) -> dict:
        return read_json(self.done_file)

    def best_checkpoint(self) -> Path:
        """The selected checkpoint, found by its recorded name inside this folder (a moved run still works), verified
        against the checksum recorded when it was written."""
        if not self.is_done():
            raise FileNotFoundError(f"{self.path}: not finished (no {DONE}); run `tlese cv` first")
        info = self.done()
        checkpoint = self.checkpoints / Path(info["best_checkpoint"]).name
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: the checkpoint this stage selected is missing")
        expected = info.get("best_sha256")
        if expected and sha256_file(checkpoint) != expected:
            raise ValueError(f"{checkpoint}: content differs from the checksum recorded when it was saved (damaged or "
                             f"replaced); delete {self.path} to retrain it")
        return checkpoint

    def claim(self, made_from: dict, force: bool = False) -> None:
        """Record what this stage is made from, or check the record of an earlier (finished or interrupted) attempt.

        A different record raises StaleRunError naming the keys that changed; with `force` the old attempt is deleted.
        A folder with training artefacts but no record (made before records existed) is treated the same way.
        """
        if self.made_from_file.is_file():
            recorded = read_json(self.made_from_file)
            changed = differences(recorded, made_from)
            if not changed:
                return
            problem = f"made from other settings or data ({'; '.join(changed[:8])})"
        elif self.path.is_dir() and any(not entry.name.startswith(".") for entry in self.path.iterdir()):
            problem = "holds results with no record of what made them"
        else:
            problem = ""
        if problem:
            if not force:
                raise StaleRunError(f"{self.path}: {problem}. Start a new run (another `name`, e.g. --set name=NEW) "
                                    f"or retrain it with --force")
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        save_json(self.made_from_file, made_from)

    def clear(self) -> None:
        """Delete everything in the folder but its lock (which the caller may hold)."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            if entry.name != ".lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def made_from(self) -> dict | None:
        return read_json(self.made_from_file) if self.made_from_file.is_file() else None

    @contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """Exclusive lock across processes and machines sharing the folder: one job trains, the others wait.

        Ranks > 0 of a DDP group do not lock (their rank 0 does; they must not wait on their own group's lock).
        """
        from filelock import FileLock

        if _process_rank() != 0:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path / ".lock"), timeout=timeout):
            yield


@dataclass(frozen=True)
class FoldDir(StageDir):
    """Stage 2 of one arm on one fold: its split, record and predictions."""

    fold: int = 0

    @property
    def split_file(self) -> Path:
        return self.path / "split.csv"

    @property
    def record_file(self) -> Path:
        return self.path / "fold_info.json"

    @property
    def image_predictions_file(self) -> Path:
        return self.path / PREDICTIONS_IMAGES

    @property
    def breast_predictions_file(self) -> Path:
        return self.path / PREDICTIONS_BREASTS

    def is_predicted(self) -> bool:
        return self.record_file.is_file() and self.image_predictions_file.is_file()

    def split(self) -> pd.DataFrame:
        if not self.split_file.is_file():
            raise FileNotFoundError(f"{self.split_file}: the fold's record of its patients is missing")
        return pd.read_csv(self.split_file, dtype={"patient_id": str}, keep_default_na=False)

    def test_patients(self) -> set[str]:
        split = self.split()
        return set(split.loc[split["role"] == "test", "patient_id"])

    def record(self) -> dict:
        if not self.record_file.is_file():
            raise FileNotFoundError(f"{self.record_file}: no finished fold here (run `tlese cv` first)")
        return read_json(self.record_file)

    def model_spec(self) -> ModelSpec:
        """The model this fold trained, as its record says (never recomputed from the config)."""
        record = self.record()
        if "model_spec" not in record:
            raise ValueError(f"{self.record_file}: made before fold records carried the model spec (its classes, "
                             "input and preprocessing); retrain this fold: `tlese cv --config <run>/config.yaml "
                             f"--arm {record.get('arm', '<arm>')} --fold {self.fold}"
                             + (f" --repeat {record['repeat']}" if record.get("repeat") else "") + " --no-resume`")
        try:
            return ModelSpec.from_dict(record["model_spec"], where=f"{self.record_file} model_spec")
        except ModelSpecError as error:
            raise ValueError(str(error)) from None

    def predictions(self, unit: str) -> pd.DataFrame | None:
        """`unit` "images" or "breasts"; None when the fold has none of that kind."""
        path = self.image_predictions_file if unit == "images" else self.breast_predictions_file
        if not path.is_file():
            return None
        return pd.read_csv(path, dtype={"patient_id": str, "image_id": str}, keep_default_na=False)


@dataclass(frozen=True)
class ArmDir:
    """One arm of one repeat: its stage 1 and its folds."""

    path: Path
    arm: str = ""
    repeat: int = 0

    @property
    def name(self) -> str:
        return self.arm or self.path.name

    @property
    def stage1(self) -> StageDir:
        return StageDir(self.path / "stage1_cxr")

    @property
    def stage1_summary_file(self) -> Path:
        return self.stage1.path / "stage_summary.json"

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.path / f"fold_{int(k)}", fold=int(k))

    def folds(self) -> list[FoldDir]:
        """Every fold folder present, in fold order."""
        found = []
        for path in self.path.glob("fold_*"):
            suffix = path.name.removeprefix("fold_")
            if path.is_dir() and suffix.isdigit():
                found.append(FoldDir(path, fold=int(suffix)))
        return sorted(found, key=lambda fold_dir: fold_dir.fold)

    def predicted_folds(self) -> list[FoldDir]:
        return [fold_dir for fold_dir in self.folds() if fold_dir.is_predicted()]


@dataclass(frozen=True)
class RunDir:
    """A cross-validation run folder."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, experiment) -> RunDir:
        return cls(Path(experiment.output_dir) / experiment.name)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def environment_file(self) -> Path:
        return self.path / "environment.json"

    @property
    def notes_file(self) -> Path:
        return self.path / "notes.json"

    @property
    def data_summary_file(self) -> Path:
        return self.path / "data_summary.csv"

    @property
    def cluster_dir(self) -> Path:
        """Scheduler records of `tlese submit` (job scripts, per-step state, logs); owned by `tlese.cluster`."""
        return self.path / CLUSTER_DIR

    def folds_file(self, seed: int, k: int) -> Path:
        return self.path / f"folds_seed{seed}_k{k}.csv"

    def data_summary_file_of(self, repeat: int) -> Path:
        """The fold summary of a repeat's folds (repeat 0: data_summary.csv)."""
        return self.data_summary_file if repeat == 0 else self.path / f"data_summary_repeat{int(repeat)}.csv"

    @contextmanager
    def folds_lock(self) -> Iterator[None]:
        """Held while a fold file is drawn or checked (cluster jobs of one repeat may start at the same moment)."""
        from filelock import FileLock

        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path / ".folds.lock")):
            yield

    def arm(self, name: str, repeat: int = 0) -> ArmDir:
        """The arm's folder of one repeat (repeat 0 is the arm folder itself)."""
        path = self.path / name if repeat == 0 else self.path / name / f"repeat_{int(repeat)}"
        return ArmDir(path, arm=name, repeat=int(repeat))

    def arm_repeats(self, name: str) -> list[int]:
        """The repeats of an arm that have a folder (repeat 0 when the arm folder holds folds or stage 1)."""
        base = self.path / name
        found = [0] if any(base.glob("fold_*")) or (base / "stage1_cxr").is_dir() else []
        for path in base.glob("repeat_*"):
            suffix = path.name.removeprefix("repeat_")
            if path.is_dir() and suffix.isdigit() and int(suffix) > 0:
                found.append(int(suffix))
        return sorted(found)

    def require(self) -> None:
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.config_file}: not a run folder (no resolved config)")

    def notes(self) -> list[str]:
        return read_json(self.notes_file) if self.notes_file.is_file() else []

    def add_notes(self, notes: list[str]) -> list[str]:
        """Add `notes` to the run's notes (each once, in order) under a lock: jobs of other arms, folds and repeats
        write theirs at the same time. Returns the notes now recorded."""
        from filelock import FileLock

        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path / ".notes.lock")):
            merged = list(dict.fromkeys([*self.notes(), *notes]))
            save_json(self.notes_file, merged)
        return merged


CLUSTER_DIR = "cluster"
RESERVED_ARM_NAMES = frozenset({CLUSTER_DIR})
"""Names an arm cannot have: folders of the run that are not arms."""


def _process_rank() -> int:
    """This process's rank in a multi-process job (0 alone): torchrun / Lightning (LOCAL_RANK, NODE_RANK) or SLURM's
    srun (SLURM_PROCID) — under srun without a launcher every task would otherwise take the lock and deadlock DDP."""
    for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        if int(os.environ.get(name, 0) or 0) != 0:
            return 1
    return 0

