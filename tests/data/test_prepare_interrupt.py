"""A prepare run killed half-way (kill -9) loses nothing it finished, leaves no worker behind, and the rerun ends
with the same manifest and summary as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import synthetic_breast
from PIL import Image

from tlese.data.cache import JOURNAL_NAME, MANIFEST_NAME, prepare_table
from tlese.data.preprocess import PreprocessParams

SIZE = 48
N_IMAGES = 120


def _dataset(folder: Path) -> Path:
    """A manifest-adapter dataset: N_IMAGES breasts, one facing the other way from its label, one listed twice."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for index in range(N_IMAGES):
        side = "L" if index % 2 else "R"
        facing = "L" if index == 8 else side  # img008 is labelled R but faces L
        Image.fromarray(synthetic_breast(side=facing, seed=index).astype(np.uint16)).save(
            folder / "img" / f"{index:03d}.png")
        rows.append({"patient_id": f"P{index // 2:03d}", "side": side, "view": "MLO", "path": f"img/{index:03d}.png"})
    rows.append(dict(rows[10]))  # the same image listed again for its patient
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def _prepare_command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tlese.cli", "prepare", "--dataset", "manifest", "--root", str(root),
            "--out", str(out), "--size", str(SIZE), "--workers", "2", "--no-progress"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the "(name)" field
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has died and only waits to be reaped


def _summary_lines(text: str) -> list[str]:
    """The summary without the counts line (prepared/cached differ by design) and the cache folder line."""
    return [line for line in text.splitlines() if not line.startswith(("images:", "cache:"))]


def test_kill_9_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path):
    if not Path("/proc/self/stat").is_file():
        import pytest

        pytest.skip("needs /proc to find the worker processes")
    root = _dataset(tmp_path / "data")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    whole = subprocess.run(_prepare_command(root, tmp_path / "whole"), capture_output=True, text=True,
                           env=environment, timeout=300)
    assert whole.returncode == 0, whole.stderr

    folder = tmp_path / "killed" / PreprocessParams(size=SIZE).fingerprint()
    process = subprocess.Popen(_prepare_command(root, tmp_path / "killed"), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            journal = folder / JOURNAL_NAME
            if journal.is_file() and journal.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        workers = _children(process.pid)
        assert process.poll() is None and workers, "the run ended (or never started a worker) before the kill"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    finished = (folder / JOURNAL_NAME).read_text().count("\n")
    assert 3 <= finished < N_IMAGES, "the kill did not land mid-way"
    assert not (folder / MANIFEST_NAME).exists()  # the manifest proper is written at the end only

    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived their killed parent"

    again = subprocess.run(_prepare_command(root, tmp_path / "killed"), capture_output=True, text=True,
                           env=environment, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (folder / MANIFEST_NAME).read_text() == (tmp_path / "whole" / folder.name / MANIFEST_NAME).read_text()
    assert not (folder / JOURNAL_NAME).exists()
    assert _summary_lines(again.stdout) == _summary_lines(whole.stdout)
    assert "img/008.png" in again.stdout  # the facing mismatch survives the kill
    assert "1 row(s) dropped" in again.stdout  # and so does the duplicate
    counts = again.stdout.splitlines()[0].split()
    assert counts[1] == "121" and int(counts[3]) + int(counts[5]) == N_IMAGES and counts[7] == "0"
    assert int(counts[5]) >= finished  # every image finished before the kill was reused


def test_a_png_written_without_its_manifest_row_is_prepared_again_with_its_facing(tmp_path):
    # what a kill between a worker's write and the parent's record leaves behind
    path = tmp_path / "mirrored.png"
    Image.fromarray(synthetic_breast(side="L").astype(np.uint16)).save(path)  # faces L, labelled R
    table = pd.DataFrame([{"path": str(path), "side": "R"}])
    params = PreprocessParams(size=SIZE)
    _, first = prepare_table(table, params, tmp_path / "cache", workers=1, progress=False)
    assert first.facing_mismatch == [str(path)]
    (tmp_path / "cache" / params.fingerprint() / MANIFEST_NAME).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, second = prepare_table(table, params, tmp_path / "cache", workers=1, progress=False)
    assert (second.prepared, second.cached, second.repaired) == (1, 0, [])
    assert second.facing_mismatch == [str(path)]
