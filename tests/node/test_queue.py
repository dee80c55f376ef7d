"""The node's queue and configuration without a network: states, revisions, claims, recovery, retention."""

from __future__ import annotations

import pytest

from tlese.node.config import NodeConfigError, parse_config
from tlese.node.queue import WorkQueue, read_status

BASE = {"work_dir": "w", "allowed_calling_aets": ["ORTHANC"],
        "destination": {"dimse": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}}}


def test_config_defaults_and_errors(tmp_path):
    config = parse_config(dict(BASE), "node.yaml", base=tmp_path)
    assert config.work_dir == tmp_path / "w" and config.host == "127.0.0.1" and config.ae_title == "TLESE"
    assert config.allowed_calling_aets == ("ORTHANC",) and config.watch is None
    with pytest.raises(NodeConfigError, match="node.yaml: unknown key"):
        parse_config({**BASE, "quiet": 3}, "node.yaml")
    with pytest.raises(NodeConfigError, match="needs allowed_calling_aets"):
        parse_config({**BASE, "allowed_calling_aets": []}, "node.yaml")
    with pytest.raises(NodeConfigError, match="exactly one of"):
        parse_config({**BASE, "destination": {"ftp": {}}}, "node.yaml")
    with pytest.raises(NodeConfigError, match="destination.dimse: missing key 'port'"):
        parse_config({**BASE, "destination": {"dimse": {"ae_title": "X", "host": "h"}}}, "node.yaml")
    with pytest.raises(NodeConfigError, match="longer than 16"):
        parse_config({**BASE, "ae_title": "A" * 17}, "node.yaml")
    web = parse_config({**BASE, "port": 0, "allowed_calling_aets": [],
                        "destination": {"dicomweb": {"url": "http://127.0.0.1:8042/dicom-web/"}},
                        "watch": {"url": "http://127.0.0.1:8042/dicom-web", "interval_seconds": 5}}, "node.yaml")
    assert web.destination.url.endswith("/dicom-web") and web.watch_interval_seconds == 5


def test_queue_quiet_claim_revision_recover(tmp_path):
    queue = WorkQueue(tmp_path / "q.sqlite")
    assert queue.add_instance("i1", "s1", "p1", "aa", "/x/1", now=100.0) == "new"
    assert queue.add_instance("i1", "s1", "p1", "aa", "/x/1", now=101.0) == "duplicate"
    assert queue.add_instance("i2", "s2", "p1", "bb", "/x/2", now=103.0) == "new"  # the same patient, another study
    assert queue.claim(now=103.5, quiet_seconds=1) == []  # the patient's last image is too recent
    (job,) = queue.claim(now=104.5, quiet_seconds=1)
    assert job.studies == {"s1": 1, "s2": 1} and sorted(job.inputs) == [("/x/1", "aa"), ("/x/2", "bb")]
    assert queue.claim(now=200, quiet_seconds=1) == []  # claimed once
    # an image arriving while processing: the result is recorded, then the study is processed again
    assert queue.add_instance("i3", "s2", "p1", "cc", "/x/3", now=105.0) == "new"
    result = {"sr_path": "/r", "sop_uid": "1.2.3", "series_uid": "1.2", "summary": "L ok"}
    queue.finish([("s1", 1, result, ""), ("s2", 1, dict(result, sop_uid="1.2.4"), "")], now=106.0)
    states = {row["study_key"]: (row["state"], row["revision"]) for row in queue.status()}
    assert states == {"s1": ("done", 1), "s2": ("receiving", 2)}
    (job,) = queue.claim(now=110, quiet_seconds=1)
    assert job.studies == {"s2": 2} and len(job.inputs) == 3  # the whole patient feeds the prediction
    assert queue.recover(now=111) == 1  # a kill while processing: claimed again, same revision
    (job,) = queue.claim(now=112, quiet_seconds=1)
    assert job.studies == {"s2": 2}
    assert queue.previous_result("s2", 2).sop_uid == "1.2.4"
    # delivery with a failure, then retention
    due = queue.due_results(now=200)
    assert [r.study_key for r in due] == ["s1", "s2"]
    queue.failed(due[0].result_id, "down", next_try=300)
    assert [r.study_key for r in queue.due_results(now=250)] == ["s2"]
    queue.delivered(due[0].result_id, now=301)
    assert queue.expired_instances(now=302, retention_seconds=0) == [("i1", "/x/1")]  # s2 still processing
    assert queue.expired_instances(now=302, retention_seconds=60) == []
    queue.mark_deleted(["i1"])
    assert queue.expired_instances(now=400, retention_seconds=60) == []
    assert queue.note_ignored("s9", "modality CT is not MG", now=1) is True
    assert queue.note_ignored("s9", "modality CT is not MG", now=2) is False
    rows = {row["study_key"]: row for row in read_status(tmp_path / "q.sqlite")}
    assert rows["s9"]["state"] == "ignored" and rows["s1"]["delivery"] == "delivered" and rows["s1"]["on_disk"] == 0
    with pytest.raises(FileNotFoundError, match="no node queue here"):
        read_status(tmp_path / "nothing.sqlite")
