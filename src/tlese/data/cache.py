"""Prepare a table of images once: preprocess in worker processes and cache the results as 16-bit PNGs.

Layout: `cache_dir/<params.fingerprint()>/` holds `params.json` (the PreprocessParams and PREPROCESS_VERSION),
`manifest.csv` (one row per source: source path, size, mtime, side, view, prepared file) and the PNGs. A PNG is
named by a hash of (source path, file size, mtime, side, expected view), so an edited source or a changed label gets
a new file and a second run reuses exactly the images whose inputs did not change (a cache hit is a PNG that
exists under its key). One bad file never stops the run: it is skipped and reported with its reason.
"""

from __future__ import annotations

from collections import Counter

import csv
import hashlib
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams

MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "params.json"
# zlib level 1: ~160 KB and ~20 ms per 512 x 512 16-bit image; level 0 writes in ~8 ms but 512 KB.
PNG_COMPRESS_LEVEL = 1
MANIFEST_COLUMNS = ("source", "size", "mtime_ns", "side", "view", "prepared", "view_in_file", "side_in_file",
                    "facing", "flipped")


@dataclass
class PrepareSummary:
    """What a prepare run did; `str()` is the human summary printed by `tlese prepare`."""

    images: int = 0
    prepared: int = 0
    cached: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    seconds: float = 0.0
    cache_dir: str = ""
    # Sources whose image content faces the other way from their side label (prepared as labelled; check them).
    facing_mismatch: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"images: {self.images}  prepared: {self.prepared}  cached: {self.cached}  "
            f"skipped: {len(self.skipped)}  seconds: {self.seconds:.1f}",
            f"cache: {self.cache_dir}",
        ]
        shown = self.skipped[:MAX_LISTED]  # a broken folder must not flood the terminal; the count stays exact
        lines += [f"  skipped {path}: {reason}" for path, reason in shown]
        if len(self.skipped) > len(shown):
            reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
            lines.append(f"  ... and {len(self.skipped) - len(shown)} more; by reason: {dict(reasons)}")
        if self.facing_mismatch:
            lines.append(f"  {len(self.facing_mismatch)} image(s) face the other way from their side label "
                         "(prepared as labelled; check the label or the file):")
            lines += [f"    {path}" for path in self.facing_mismatch]
        return "\n".join(lines)


MAX_LISTED = 20


def cache_key(source: str | Path, side: str | None, view: str | None) -> str:
    """Name of the prepared PNG for a source file as it is now (path, size, mtime) and its labels."""
    source = Path(source).resolve()
    stat = source.stat()
    text = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{side or ''}|{view or ''}"
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def write_png16(image: np.ndarray, path: str | Path) -> None:
    """Save a [0, 1] float image as a 16-bit grayscale PNG, atomically (no half-written file on a crash)."""
    from PIL import Image

    path = Path(path)
    quantised = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(quantised).save(temporary, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    os.replace(temporary, path)


def read_png16(path: str | Path) -> np.ndarray:
    """Read a prepared 16-bit PNG back as float32 in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    scale = 65535.0 if array.dtype != np.uint8 else 255.0
    return array.astype(np.float32) / np.float32(scale)


def prepare_table(
    table: pd.DataFrame,
    params: PreprocessParams,
    cache_dir: str | Path,
    workers: int = 2,
    progress: bool = True,
) -> tuple[pd.DataFrame, PrepareSummary]:
    """Preprocess every row's `path` (oriented by `side`, checked against `view` when present) into the cache.

    Returns the rows that succeeded with a `prepared_path` column, and a summary; failed rows are listed in
    `summary.skipped` with their reason (and a warning is issued), never silently dropped.
    """
    started = time.perf_counter()
    missing = {"path", "side"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks column(s) {sorted(missing)}; has {list(table.columns)}")
    out_dir = Path(cache_dir) / params.fingerprint()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_params(out_dir, params)

    jobs: dict[str, tuple] = {}  # key -> job, so a source listed twice with the same labels is prepared once
    row_keys: list[str | None] = []
    failures: dict[str, str] = {}  # source -> reason
    for row in table.itertuples(index=False):
        source = str(row.path)
        side, view = _label(getattr(row, "side", None)), _label(getattr(row, "view", None))
        try:
            key = cache_key(source, side, view)
        except OSError as error:
            failures[source] = f"cannot access file ({error.strerror or error})"
            row_keys.append(None)
            continue
        row_keys.append(key)
        jobs.setdefault(key, (source, side, view, str(out_dir / f"{key}.png")))

    manifest = _read_manifest(out_dir)
    todo = {key: job for key, job in jobs.items() if not Path(job[3]).is_file()}
    summary = PrepareSummary(images=len(table), cache_dir=str(out_dir))
    summary.cached = len(jobs) - len(todo)
    results = _run_jobs(list(todo.values()), params, workers, progress)
    for key, job in todo.items():
        ok, info = results[job[0], job[1], job[2]]
        if ok:
            summary.prepared += 1
            manifest[job[0]] = _manifest_row(job, info)
        else:
            failures[job[0]] = info
    for key, job in jobs.items():
        if key not in todo and job[0] not in manifest:
            manifest[job[0]] = _manifest_row(job, {})
        entry = manifest.get(job[0], {})
        labelled = job[1] or entry.get("side_in_file")
        if job[0] not in failures and labelled and entry.get("facing") and entry["facing"] != labelled:
            summary.facing_mismatch.append(job[0])
    _write_manifest(out_dir, manifest)

    prepared_paths = [
        jobs[key][3] if key is not None and str(jobs[key][0]) not in failures else None for key in row_keys
    ]
    result = table.copy()
    result["prepared_path"] = prepared_paths
    keep = result["prepared_path"].notna().to_numpy()
    for source, reason in failures.items():
        summary.skipped.append((source, reason))
    summary.seconds = time.perf_counter() - started
    if summary.skipped:
        warnings.warn(f"prepare: skipped {len(summary.skipped)} of {summary.images} images, "
                      f"e.g. {summary.skipped[0][0]}: {summary.skipped[0][1]}", stacklevel=2)
    return result.loc[keep].reset_index(drop=True), summary


# ---------------------------------------------------------------------------------------------------------------
# Workers


def _prepare_one(job: tuple, params_dict: dict) -> tuple[bool, dict | str]:
    """Runs in a worker: read, check, preprocess, write. Returns (True, header info) or (False, reason)."""
    from tlese.data.io import ImageReadError, check_header_against, read_image
    from tlese.data.preprocess import preprocess_with_info

    source, side, view, out_path = job
    try:
        pixels, header = read_image(source)
        check_header_against(header, view, side, source)
        image, found = preprocess_with_info(pixels, side or header.side, PreprocessParams.from_dict(params_dict))
        write_png16(image, out_path)
    except ImageReadError as error:
        return False, error.reason
    except MemoryError:
        return False, "out of memory while preparing"
    except Exception as error:  # one bad file must never stop the run; report it instead
        return False, f"{type(error).__name__}: {error}"
    return True, {"view_in_file": header.view or "", "side_in_file": header.side or "",
                  "facing": found["facing"] or "", "flipped": int(found["flipped"])}


def _init_worker() -> None:
    # One process per core: stop torch (used for resizing) from also starting a thread per core in every worker.
    import torch

    torch.set_num_threads(1)


@contextmanager
def _single_torch_thread():
    """Run with one torch thread, as a worker does: the small resizes got 2-3x *slower* with more threads on a
    loaded 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_jobs(jobs: list[tuple], params: PreprocessParams, workers: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    params_dict = params.to_dict()
    results: dict = {}
    bar = tqdm(total=len(jobs), desc="prepare", unit="img", disable=not progress or not jobs, file=sys.stderr)
    if workers <= 1 or len(jobs) <= 1:
        with _single_torch_thread():
            for job in jobs:
                results[job[:3]] = _prepare_one(job, params_dict)
                bar.update()
    else:
        import multiprocessing

        # spawn, not fork: forking a parent that already runs torch/OpenMP threads can deadlock the children.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_prepare_one, job, params_dict): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    results[job[:3]] = future.result()
                except Exception as error:  # a worker died (e.g. killed for memory)
                    results[job[:3]] = (False, f"worker failed: {type(error).__name__}: {error}")
                bar.update()
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Manifest and params


def _label(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(getattr(value, "value", value)).strip()
    return text or None


def _manifest_row(job: tuple, info: dict) -> dict:
    source, side, view, out_path = job
    stat = Path(source).stat()
    return {
        "source": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "side": side or "",
        "view": view or "", "prepared": Path(out_path).name,
        **{key: info.get(key, "") for key in ("view_in_file", "side_in_file", "facing", "flipped")},
    }


def _read_manifest(out_dir: Path) -> dict[str, dict]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {row["source"]: row for row in csv.DictReader(handle)}


def _write_manifest(out_dir: Path, manifest: dict[str, dict]) -> None:
    temporary = out_dir / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for source in sorted(manifest):
            writer.writerow(manifest[source])
    os.replace(temporary, out_dir / MANIFEST_NAME)


def _write_params(out_dir: Path, params: PreprocessParams) -> None:
    path = out_dir / PARAMS_NAME
    if not path.is_file():
        payload = {"preprocess_version": PREPROCESS_VERSION, "params": params.to_dict()}
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
