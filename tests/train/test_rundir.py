"""The run folder's records: written whole or not at all (a full disk names the file), notes merged under a lock."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os

import pytest

from tlese.train.rundir import RunDir, save_json


def _full_disk(monkeypatch):
    """Every fsync fails as a full disk makes it fail (delayed allocation reports ENOSPC when data reaches the disk)."""

    def fsync(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_leaves_the_previous_record_and_says_which_file_in_one_line(tmp_path, monkeypatch):
    record = tmp_path / "fold_0" / "fold_info.json"
    save_json(record, {"fold": 0, "version": 1})
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as caught:
        save_json(record, {"fold": 0, "version": 2})
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert caught.value.filename == str(record) and str(record) in message and "\n" not in message
    assert "No space left on device" in message
    assert json.loads(record.read_text()) == {"fold": 0, "version": 1}  # the old record, whole
    assert sorted(path.name for path in record.parent.iterdir()) == ["fold_info.json"]  # no temporary left behind


def _add_notes(run_path, worker: int) -> None:
    run = RunDir(run_path)
    for index in range(15):
        run.add_notes([f"worker {worker} note {index}", "shared note"])


def test_notes_written_by_concurrent_jobs_are_all_kept(tmp_path):
    RunDir(tmp_path).add_notes(["first"])
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_notes, args=(tmp_path, worker)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    notes = RunDir(tmp_path).notes()
    expected = {"first", "shared note", *(f"worker {w} note {i}" for w in range(4) for i in range(15))}
    assert set(notes) == expected and len(notes) == len(expected) and notes[0] == "first"
