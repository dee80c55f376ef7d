"""Prepare a table of images once: preprocess in worker processes and cache the results as 16-bit PNGs.

Layout: `cache_dir/<params.fingerprint()>/` holds `params.json` (the PreprocessParams and PREPROCESS_VERSION),
`manifest.csv` (one row per prepared PNG: source path, size, mtime, sha256 of the source bytes, a hash of its
SOPInstanceUID, side, view, what preprocessing found, the PNG's name, size and sha256) and the PNGs. A PNG is named
by a hash of (source path, file size, mtime, side, expected view), so an edited source or a changed label gets a new
file and a second run reuses exactly the images whose inputs did not change. A cache hit is a PNG whose manifest
row exists and whose size and sha256 match it; a damaged PNG is prepared again and noted in the summary.

Durability: each finished image is appended to `manifest.journal` (JSON lines) as its result arrives; the end of
the run folds the journal into `manifest.csv`. A run killed half-way therefore loses nothing it finished, and the
next run replays the journal. Workers die with the process that started them (no orphans after a `kill -9`).

Identity: one image (same resolved path, same SOPInstanceUID or same file bytes) under two patients, or listed with
two different labels, raises DataIntegrityError; listed twice alike for one patient, it is kept once and noted.

Skips: one bad file never stops the run: it is skipped and reported with its reason. A worker that dies (e.g.
killed for memory) is replaced, and the files it may have been preparing are retried one at a time in a fresh
process, so the file that kills a worker is named. More than `max_skipped_fraction` skipped raises PrepareError.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from tlese.data.io import ImageReadError
from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams, UnusableImageError, prepare_file
from tlese.files import sha256_file, write_bytes_atomic
from tlese.vocab import Side

MANIFEST_NAME = "manifest.csv"
JOURNAL_NAME = "manifest.journal"
PARAMS_NAME = "params.json"
# zlib level 1: ~160 KB and ~20 ms per 512 x 512 16-bit image; level 0 writes in ~8 ms but 512 KB.
PNG_COMPRESS_LEVEL = 1
MANIFEST_COLUMNS = ("source", "size", "mtime_ns", "sha256", "instance_hash", "side", "view", "prepared",
                    "png_size", "png_sha256", "view_in_file", "side_in_file", "facing", "flipped")
# Columns that say what a row claims about its image: one image listed twice must agree on them.
LISTING_COLUMNS = ("side", "view", "label", "target")
DEFAULT_MAX_SKIPPED_FRACTION = 0.1
MAX_LISTED = 20
# Jobs handed to the pool per worker: enough to keep workers busy, few enough that the jobs in flight when a worker
# dies (all suspects, each retried alone) stay few.
IN_FLIGHT_PER_WORKER = 2


class DataIntegrityError(ValueError):
    """The table gives one image to two patients, or two labels to one image: training on it would leak or
    contradict. `conflicts` lists each case as text."""

    def __init__(self, conflicts: list[str]):
        self.conflicts = conflicts
        shown = "; ".join(conflicts[:MAX_LISTED])
        more = f"; ... and {len(conflicts) - MAX_LISTED} more" if len(conflicts) > MAX_LISTED else ""
        super().__init__(f"{len(conflicts)} image(s) listed for two patients or with two labels (fix the dataset "
                         f"table; prepared images stay cached): {shown}{more}")


class PrepareError(ValueError):
    """Too many images were skipped; `summary` is the PrepareSummary of the run (its images stay cached)."""

    def __init__(self, message: str, summary: PrepareSummary):
        self.summary = summary
        super().__init__(message)


@dataclass
class PrepareSummary:
    """What a prepare run did; `str()` is the human summary printed by `tlese prepare`.

    Paths are shown relative to prepare_table's `root` when one was given.
    """

    images: int = 0
    prepared: int = 0
    cached: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    seconds: float = 0.0
    cache_dir: str = ""
    # Sources whose image content faces the other way from their side label (prepared as labelled; check them).
    facing_mismatch: list[str] = field(default_factory=list)
    # Rows dropped because the same image was listed again for the same patient: (dropped path, why).
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    # Cached PNGs found damaged and prepared again: (source path, what was wrong).
    repaired: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"images: {self.images}  prepared: {self.prepared}  cached: {self.cached}  "
            f"skipped: {len(self.skipped)}  seconds: {self.seconds:.1f}",
            f"cache: {self.cache_dir}",
        ]
        lines += _listed("skipped", self.skipped)
        if self.duplicates:
            lines.append(f"  {len(self.duplicates)} row(s) dropped: the same image listed again for the same patient")
            lines += _listed("duplicate", self.duplicates)
        if self.repaired:
            lines.append(f"  {len(self.repaired)} damaged cached image(s) prepared again")
            lines += _listed("repaired", self.repaired)
        if self.facing_mismatch:
            lines.append(f"  {len(self.facing_mismatch)} image(s) face the other way from their side label "
                         "(prepared as labelled; check the label or the file):")
            lines += [f"    {path}" for path in self.facing_mismatch]
        return "\n".join(lines)


def _listed(word: str, entries: list[tuple[str, str]]) -> list[str]:
    shown = entries[:MAX_LISTED]  # a broken folder must not flood the terminal; the count stays exact
    lines = [f"  {word} {path}: {reason}" for path, reason in shown]
    if len(entries) > len(shown):
        reasons = Counter(reason.split(":")[0] for _, reason in entries)
        lines.append(f"  ... and {len(entries) - len(shown)} more; by reason: {dict(reasons)}")
    return lines


class Job(NamedTuple):
    source: str  # resolved path
    side: str | None
    view: str | None
    out_path: str


def cache_key(source: str | Path, side: str | None, view: str | None) -> str:
    """Name of the prepared PNG for a source file as it is now (path, size, mtime) and its labels."""
    source = Path(source).resolve()
    stat = source.stat()
    text = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{side or ''}|{view or ''}"
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def write_png16(image: np.ndarray, path: str | Path) -> tuple[int, str]:
    """Save a [0, 1] float image as a 16-bit grayscale PNG, atomically (no half-written file on a crash).

    Returns the file's size in bytes and its sha256 (hex), for the manifest.
    """
    from PIL import Image

    path = Path(path)
    quantised = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(quantised).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def read_png16(path: str | Path) -> np.ndarray:
    """Read a prepared 16-bit PNG back as float32 in [0, 1]; a truncated or corrupt file raises ImageReadError
    naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except FileNotFoundError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error for damaged files
        raise ImageReadError(path, f"damaged prepared PNG ({type(error).__name__}: {error}); run prepare again "
                                   "to rebuild it") from None
    if array.ndim != 2:
        raise ImageReadError(path, f"prepared PNG has shape {array.shape}, expected a 2-D grayscale image")
    scale = 65535.0 if array.dtype != np.uint8 else 255.0
    return array.astype(np.float32) / np.float32(scale)


def prepare_table(
    table: pd.DataFrame,
    params: PreprocessParams,
    cache_dir: str | Path,
    workers: int = 2,
    progress: bool = True,
    *,
    root: str | Path | None = None,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> tuple[pd.DataFrame, PrepareSummary]:
    """Preprocess every row's `path` (oriented by `side`, checked against `view` when present) into the cache.

    Returns the rows that succeeded with `prepared_path` and `source_sha256` columns, and a summary; failed rows
    are listed in `summary.skipped` with their reason (and a warning is issued), never silently dropped. A row
    repeating an image of the same patient with the same labels is dropped and listed in `summary.duplicates`.
    `root`: show every path in the summary and in errors relative to it.

    Raises DataIntegrityError when one image belongs to two patients (by `patient_id`) or carries two labels,
    and PrepareError when more than `max_skipped_fraction` of the images were skipped.
    """
    started = time.perf_counter()
    _check_arguments(table, max_skipped_fraction)
    out_dir = _open_cache(Path(cache_dir), params)
    show = _shower(table, root)
    plan = _plan_jobs(table, out_dir)
    summary = PrepareSummary(images=len(table), cache_dir=str(out_dir))
    manifest = _Manifest(out_dir)
    rows, todo = _check_cache(plan, manifest, show, summary)
    failures = _run_and_record(todo, params, workers, progress, manifest, rows)
    summary.prepared = len(todo) - len(failures)
    summary.skipped = _skipped(plan, failures, show)
    usable = [index for index, key in enumerate(plan.row_keys) if key is not None and key in rows]
    kept, conflicts = _check_identity(table, usable, plan.sources, plan.row_keys, rows, show, summary)
    summary.facing_mismatch = _facing_mismatches(plan, kept, rows, show)
    summary.seconds = time.perf_counter() - started
    if conflicts:
        raise DataIntegrityError(conflicts)
    _report_skips(summary, plan.distinct, max_skipped_fraction)
    return _result(table, plan, kept, rows), summary


# ---------------------------------------------------------------------------------------------------------------
# The steps of prepare_table


@dataclass
class _Plan:
    """What a table asks for: one job per distinct (source, side, view), and per row its source and job key."""

    jobs: dict[str, Job]  # key -> job, so a source listed twice with the same labels is prepared once
    row_keys: list[str | None]  # per row: its job's key, None when its file cannot even be looked at
    sources: list[str]  # per row: the resolved source path
    unreadable: dict[str, str]  # source -> reason, for files that cannot even be looked at

    @property
    def distinct(self) -> int:
        """Distinct images asked for (the base of the skipped fraction)."""
        return len(self.jobs) + len(self.unreadable)


def _check_arguments(table: pd.DataFrame, max_skipped_fraction: float) -> None:
    missing = {"path", "side"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks column(s) {sorted(missing)}; has {list(table.columns)}")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise ValueError(f"max_skipped_fraction must be within [0, 1], got {max_skipped_fraction}")


def _open_cache(cache_dir: Path, params: PreprocessParams) -> Path:
    """The cache folder of `params` (created, params.json written, temporaries of dead runs removed)."""
    out_dir = cache_dir / params.fingerprint()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_params(out_dir, params)
    _remove_stale_temporaries(out_dir)
    return out_dir


def _plan_jobs(table: pd.DataFrame, out_dir: Path) -> _Plan:
    """One job per distinct (source, side, view) of the table; files that cannot be looked at are noted."""
    plan = _Plan(jobs={}, row_keys=[], sources=[], unreadable={})
    for row in table.itertuples(index=False):
        source = _resolved(row.path)
        plan.sources.append(source)
        side, view = _label(getattr(row, "side", None)), _label(getattr(row, "view", None))
        try:
            key = cache_key(source, side, view)
        except OSError as error:
            plan.unreadable.setdefault(source, f"cannot access file ({error.strerror or error})")
            plan.row_keys.append(None)
            continue
        plan.row_keys.append(key)
        plan.jobs.setdefault(key, Job(source, side, view, str(out_dir / f"{key}.png")))
    return plan


def _check_cache(plan: _Plan, manifest: _Manifest, show, summary: PrepareSummary
                 ) -> tuple[dict[str, dict], dict[str, Job]]:
    """Split the jobs into valid cache hits (key -> manifest row) and jobs to run; damaged cached PNGs are noted
    in `summary.repaired` and run again."""
    rows: dict[str, dict] = {}  # key -> manifest row of every image prepared or reused in this run
    todo: dict[str, Job] = {}
    for key, job in plan.jobs.items():
        entry = manifest.rows.get(Path(job.out_path).name)
        problem = _cache_problem(job, entry)
        if problem is None:
            rows[key] = entry
        else:
            todo[key] = job
            if problem != "absent":
                summary.repaired.append((show(job.source), f"{problem}; prepared again"))
    summary.cached = len(rows)
    return rows, todo


def _run_and_record(todo: dict[str, Job], params: PreprocessParams, workers: int, progress: bool,
                    manifest: _Manifest, rows: dict[str, dict]) -> dict[str, str]:
    """Run the jobs, journaling each finished image as it arrives (into `rows` too), then fold the journal into
    the manifest; returns key -> reason of every job that failed."""
    failures: dict[str, str] = {}
    with manifest.journal() as journal:
        def record(job: Job, ok: bool, info) -> None:
            key = Path(job.out_path).stem
            if ok:
                rows[key] = _manifest_row(job, info)
                journal(rows[key])
            elif isinstance(info, CacheWriteFailure):
                raise OSError(info.errno, info.strerror, info.path)  # everything journaled so far is kept
            else:
                failures[key] = info

        _run_jobs(list(todo.values()), params, workers, progress, record)
    manifest.compact(rows)
    return failures


def _skipped(plan: _Plan, failures: dict[str, str], show) -> list[tuple[str, str]]:
    """(shown path, reason) of each image that could not be prepared, once each, in table order."""
    skipped, seen = [], set()
    for source, key in zip(plan.sources, plan.row_keys):
        reason = plan.unreadable.get(source) if key is None else failures.get(key)
        if reason is not None and (key or source) not in seen:
            seen.add(key or source)
            skipped.append((show(source), reason))
    return skipped


def _facing_mismatches(plan: _Plan, kept: list[int], rows: dict[str, dict], show) -> list[str]:
    """Shown paths of the kept images whose content faces the other way from their side (labelled, else tagged)."""
    mismatched: list[str] = []
    for index in kept:
        job, row = plan.jobs[plan.row_keys[index]], rows[plan.row_keys[index]]
        labelled = Side.parse(job.side) or Side.parse(row.get("side_in_file"))
        facing = Side.parse(row.get("facing"))
        if None not in (labelled, facing) and facing != labelled and show(job.source) not in mismatched:
            mismatched.append(show(job.source))
    return mismatched


def _report_skips(summary: PrepareSummary, distinct: int, max_skipped_fraction: float) -> None:
    """Warn about skipped and duplicate rows; PrepareError when more than `max_skipped_fraction` was skipped."""
    if summary.skipped:
        warnings.warn(f"prepare: skipped {len(summary.skipped)} of {distinct} images, "
                      f"e.g. {summary.skipped[0][0]}: {summary.skipped[0][1]}", stacklevel=3)
    if summary.duplicates:
        warnings.warn(f"prepare: dropped {len(summary.duplicates)} row(s) listing an image again for the same "
                      f"patient, e.g. {summary.duplicates[0][0]}: {summary.duplicates[0][1]}", stacklevel=3)
    if len(summary.skipped) > max_skipped_fraction * distinct:
        reasons = Counter(reason.split(" (")[0].split(":")[0] for _, reason in summary.skipped).most_common(3)
        top = "; ".join(f"{reason} ({count})" for reason, count in reasons)
        raise PrepareError(
            f"prepare: skipped {len(summary.skipped)} of {distinct} images ({len(summary.skipped) / distinct:.0%}), "
            f"more than max_skipped_fraction={max_skipped_fraction:g}; top reasons: {top}. Fix the files, or accept "
            "the loss with a higher max_skipped_fraction (prepare_table) / --max-skipped-fraction (tlese prepare). "
            f"Skipped e.g. {summary.skipped[0][0]}: {summary.skipped[0][1]}", summary)


def _result(table: pd.DataFrame, plan: _Plan, kept: list[int], rows: dict[str, dict]) -> pd.DataFrame:
    """The kept rows with `prepared_path` and `source_sha256`."""
    result = table.iloc[kept].copy()
    result["prepared_path"] = [plan.jobs[plan.row_keys[index]].out_path for index in kept]
    result["source_sha256"] = [rows[plan.row_keys[index]]["sha256"] for index in kept]
    return result.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Identity


def _check_identity(table, usable, sources, row_keys, rows, show, summary) -> tuple[list[int], list[str]]:
    """Group the usable rows that show one image (same path, SOPInstanceUID or bytes); returns the rows to keep
    (repeats of one patient's image dropped into `summary.duplicates`) and the conflicts found."""
    patients = table["patient_id"].tolist() if "patient_id" in table.columns else [None] * len(table)
    listing_columns = [column for column in LISTING_COLUMNS if column in table.columns]
    listings = [tuple(_label(value) for value in values)
                for values in table[listing_columns].itertuples(index=False, name=None)]
    parent = {index: index for index in usable}

    def find(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    def identity(index: int) -> dict[str, str | None]:
        row = rows[row_keys[index]]
        return {"path": sources[index], "uid": row.get("instance_hash"), "sha256": row.get("sha256")}

    first: dict[tuple, int] = {}
    shared: dict[tuple, str] = {}  # identity -> kind, for identities that several rows share
    kinds = {"path": "same file", "uid": "same SOPInstanceUID", "sha256": "same file content (sha256)"}
    for index in usable:
        for kind, value in identity(index).items():
            if not value:
                continue
            other = first.setdefault((kind, value), index)
            if other != index:
                shared[(kind, value)] = kinds[kind]
                parent[find(index)] = find(other)
    groups: dict[int, list[int]] = {}
    for index in usable:
        groups.setdefault(find(index), []).append(index)
    evidence: dict[int, set[str]] = {}
    for (kind, value), text in shared.items():
        evidence.setdefault(find(first[(kind, value)]), set()).add(text)

    kept, conflicts = [], []
    for group_root, members in groups.items():
        kept.append(members[0])
        if len(members) == 1:
            continue
        why = " and ".join(sorted(evidence.get(group_root, {"same file"})))
        owners = list(dict.fromkeys(str(patients[index]) for index in members))
        places = list(dict.fromkeys((str(patients[index]), show(sources[index])) for index in members))
        if len(owners) > 1:
            listed = ", ".join(f"patient {patient} ({path})" for patient, path in places[:4])
            conflicts.append(f"one image ({why}) under {len(owners)} patients: {listed}")
            continue
        variants = list(dict.fromkeys(listings[index] for index in members))
        if len(variants) > 1:
            described = ", ".join(f"{'/'.join(value or '-' for value in listings[index])} ({show(sources[index])})"
                                  for index in members[:4])
            conflicts.append(f"one image ({why}) of patient {owners[0]} listed with different "
                             f"{'/'.join(listing_columns)}: {described}")
            continue
        kept_identity = identity(members[0])
        for index in members[1:]:
            if sources[index] == sources[members[0]]:
                why_here = "listed again"
            else:
                common = [kinds[kind] for kind, value in identity(index).items()
                          if value and value == kept_identity[kind]]
                why_here = f"{' and '.join(common) or why} as {show(sources[members[0]])}"
            summary.duplicates.append((show(sources[index]), f"{why_here} for patient {owners[0]}; kept once"))
    return sorted(kept), conflicts


# ---------------------------------------------------------------------------------------------------------------
# Workers


class CacheWriteFailure(NamedTuple):
    """A worker could not write a prepared PNG: a fault of the cache's disk that stops the run (never a skip)."""

    errno: int | None
    strerror: str
    path: str


def _prepare_one(job: tuple, params_dict: dict) -> tuple[bool, dict | str]:
    """Runs in a worker: `prepare_file`, then write the PNG. Returns (True, info for the manifest) or (False,
    reason)."""
    source, side, view, out_path = job
    try:
        image, found = prepare_file(source, side, view, PreprocessParams.from_dict(params_dict))
        sha256 = sha256_file(source)
    except (ImageReadError, UnusableImageError) as error:
        return False, error.reason
    except MemoryError:
        return False, "out of memory while preparing"
    except Exception as error:  # one bad file must never stop the run; report it instead
        return False, f"{type(error).__name__}: {error}"
    try:
        png_size, png_sha256 = write_png16(image, out_path)
    except OSError as error:  # the cache's disk (full, read-only, not ours), not this image: the run stops
        return False, CacheWriteFailure(error.errno, error.strerror or str(error), str(out_path))
    except Exception as error:
        return False, f"{type(error).__name__} while writing the prepared PNG: {error}"
    header = found["header"]
    return True, {"view_in_file": header.view or "", "side_in_file": header.side or "",
                  "facing": found["facing"] or "", "flipped": int(found["flipped"]), "sha256": sha256,
                  "instance_hash": header.instance_hash or "", "png_size": png_size, "png_sha256": png_sha256}


def _init_worker(parent_pid: int | None = None) -> None:
    # One process per core: stop torch (used for resizing) from also starting a thread per core in every worker.
    import torch

    torch.set_num_threads(1)
    if parent_pid is not None:
        _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the process that started it dies: a parent killed with SIGKILL cannot stop its
    workers, which would otherwise keep running (and holding memory) for nobody."""
    watched = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            # PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL when the thread that started us exits; prepare_table
            # starts and ends its pools in the calling thread, so that is the caller's lifetime.
            watched = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0
        except (OSError, AttributeError):
            watched = False
    if os.getppid() != parent_pid:  # the parent died before the watch was set up
        os._exit(1)
    if not watched:
        import threading

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="tlese-parent-watch", daemon=True).start()


@contextmanager
def single_torch_thread():
    """Run the block with one torch thread, as a prepare worker does (torch resizes; the small resizes got 2-3x
    *slower* with more threads on a loaded 2-core machine); the previous thread count is restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


Record = Callable[[Job, bool, object], None]


def _run_jobs(jobs: list[Job], params: PreprocessParams, workers: int, progress: bool, record: Record) -> None:
    """Prepare `jobs`, calling `record(job, ok, info_or_reason)` for each as soon as it is done."""
    from tqdm.auto import tqdm

    params_dict = params.to_dict()
    bar = tqdm(total=len(jobs), desc="prepare", unit="img", disable=not progress or not jobs, file=sys.stderr)

    def finish(job: Job, result: tuple) -> None:
        record(job, *result)
        bar.update()

    try:
        if not jobs:
            pass  # all cached: not even torch is needed
        elif workers <= 1 or len(jobs) == 1:
            with single_torch_thread():
                for job in jobs:
                    finish(job, _prepare_one(job, params_dict))
        else:
            suspects = _run_pool(jobs, params_dict, min(workers, len(jobs)), finish)
            _run_alone(suspects, params_dict, finish)
    finally:
        bar.close()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """The process pool prepare_table runs its jobs in: `workers` spawned processes (not forked: forking a parent
    that already runs torch/OpenMP threads can deadlock the children), each with one torch thread and ending when
    this process dies. Use it as a context manager."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))


def _run_pool(jobs: list[Job], params_dict: dict, workers: int, finish) -> list[Job]:
    """Run `jobs` in a process pool, a fresh pool after each worker death; returns the jobs that were in flight
    when a worker died (any of them may have killed it)."""
    pending, suspects = deque(jobs), []
    while pending:
        in_flight: dict = {}
        broken = False
        with worker_pool(workers) as pool:
            while (pending or in_flight) and not broken:
                while pending and len(in_flight) < workers * IN_FLIGHT_PER_WORKER:
                    job = pending.popleft()
                    in_flight[pool.submit(_prepare_one, job, params_dict)] = job
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    broken |= _collect(future, job, finish, suspects)
            for future, job in in_flight.items():  # a broken pool fails every other job in flight too
                _collect(future, job, finish, suspects)
    return suspects


def _collect(future, job: Job, finish, suspects: list[Job]) -> bool:
    """Pass a finished future's result on; True (and `job` added to `suspects`) when its worker died."""
    try:
        result = future.result()
    except BrokenProcessPool:
        suspects.append(job)
        return True
    except Exception as error:  # e.g. a result that cannot be sent back
        result = (False, f"worker failed: {type(error).__name__}: {error}")
    finish(job, result)
    return False


def _run_alone(jobs: list[Job], params_dict: dict, finish) -> None:
    """Retry `jobs` one after another in a fresh process; a job during which that process dies is skipped with
    the exit code or signal, and a new process takes the rest."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    remaining = list(jobs)
    while remaining:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_serial_worker, args=(remaining, params_dict, sender, os.getpid()),
                                  name="tlese-prepare-alone", daemon=True)
        process.start()
        sender.close()  # so that the worker's death closes the pipe
        done = 0
        try:
            while done < len(remaining):
                try:
                    result = receiver.recv()
                except EOFError:
                    break
                finish(remaining[done], result)
                done += 1
        finally:
            receiver.close()
            process.join()
        if done < len(remaining):
            finish(remaining[done], (False, _death_reason(process.exitcode)))
            done += 1
        remaining = remaining[done:]


def _serial_worker(jobs: list[Job], params_dict: dict, sender, parent_pid: int) -> None:
    _init_worker(parent_pid)
    for job in jobs:
        sender.send(_prepare_one(job, params_dict))
    sender.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ", e.g. by the out-of-memory killer" if -exitcode == signal.SIGKILL else ""
        return f"worker died while preparing this file (killed by {name}{hint})"
    return f"worker died while preparing this file (exit code {exitcode})"


# ---------------------------------------------------------------------------------------------------------------
# Manifest and params


class _Manifest:
    """`manifest.csv` plus the journal of rows finished since it was last written, keyed by PNG name."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.rows = self._load()

    def _load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        path = self.out_dir / MANIFEST_NAME
        if path.is_file():
            with path.open(newline="") as handle:
                rows = {row["prepared"]: row for row in csv.DictReader(handle) if row.get("prepared")}
        journal = self.out_dir / JOURNAL_NAME
        if journal.is_file():
            for line in journal.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    continue
                rows[row["prepared"]] = {key: str(value) for key, value in row.items()}
        return rows

    @contextmanager
    def journal(self):
        """A function that appends one row to the journal, flushed at once so a killed run keeps it."""
        with (self.out_dir / JOURNAL_NAME).open("a") as handle:
            def append(row: dict) -> None:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
                handle.flush()

            yield append

    def compact(self, own: dict[str, dict]) -> None:
        """Write manifest.csv from disk (another run may have added rows) plus `own`, then drop the journal.

        Atomic (temporary file, fsync, rename): a full disk or a kill leaves the old manifest and the journal as
        they were, so nothing finished is lost and the next run compacts again."""
        rows = self._load()
        rows.update({row["prepared"]: {key: str(value) for key, value in row.items()} for row in own.values()})
        rows = {name: row for name, row in rows.items() if (self.out_dir / name).is_file()}
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for name in sorted(rows, key=lambda name: (rows[name].get("source", ""), name)):
            writer.writerow(rows[name])
        write_bytes_atomic(self.out_dir / MANIFEST_NAME, text.getvalue().encode())
        (self.out_dir / JOURNAL_NAME).unlink(missing_ok=True)
        self.rows = rows


def _cache_problem(job: Job, entry: dict | None) -> str | None:
    """None when the PNG of `job` is a valid cache hit; "absent" when there is nothing to reuse; else what is
    wrong with the cached file."""
    path = Path(job.out_path)
    if not path.is_file():
        return "absent"
    if entry is None or not entry.get("png_sha256") or not entry.get("sha256"):
        return "absent"  # written by a run killed before its manifest row, or by an older version
    size = path.stat().st_size
    if str(size) != str(entry.get("png_size")):
        return f"cached PNG damaged ({size} bytes, the manifest says {entry.get('png_size')})"
    if sha256_file(path) != entry["png_sha256"]:
        return "cached PNG damaged (its sha256 differs from the manifest's)"
    return None


def _label(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(getattr(value, "value", value)).strip()
    return text or None


def _resolved(path) -> str:
    return str(Path(str(path)).resolve())


def _shower(table: pd.DataFrame, root: str | Path | None) -> Callable[[str], str]:
    """How a resolved source path is shown: relative to `root` (posix) when given, else as the table wrote it.

    A file outside `root` (reached through a symlinked folder) is shown by its row's `image_id` when there is one,
    which adapters give relative to the root too.
    """
    shown: dict[str, str] = {}
    ids = table["image_id"] if root is not None and "image_id" in table.columns else [None] * len(table)
    base = Path(root).resolve() if root is not None else None
    for path, image_id in zip(table["path"], ids):
        source = _resolved(path)
        if source in shown:
            continue
        if base is None:
            shown[source] = str(path)
            continue
        relative = Path(os.path.relpath(source, base)).as_posix()
        shown[source] = str(image_id) if relative.startswith("../") and _label(image_id) else relative
    return lambda source: shown.get(source, source)


def _manifest_row(job: Job, info: dict) -> dict:
    stat = Path(job.source).stat()
    return {
        "source": job.source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "side": job.side or "",
        "view": job.view or "", "prepared": Path(job.out_path).name,
        **{key: info.get(key, "") for key in MANIFEST_COLUMNS if key in info},
    }


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete `.<name>.<pid>.tmp` files left by killed processes (those of live processes are being written)."""
    for temporary in out_dir.glob(".*.tmp"):
        try:
            pid = int(temporary.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            temporary.unlink(missing_ok=True)
        except OSError:  # alive, owned by someone else
            pass


def _write_params(out_dir: Path, params: PreprocessParams) -> None:
    path = out_dir / PARAMS_NAME
    if not path.is_file():
        payload = {"preprocess_version": PREPROCESS_VERSION, "params": params.to_dict()}
        write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
