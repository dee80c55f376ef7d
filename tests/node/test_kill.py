"""Exactly once under kill -9: the real `tlese node run` subprocess is killed with SIGKILL while it processes the
studies, restarted, and must deliver exactly one SR per study to the real Orthanc; its log and audit name no patient."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from orthanc import wait_for

from tlese.node.queue import read_status

pytestmark = pytest.mark.slow
TLESE = Path(sys.executable).with_name("tlese")


def start_node(bundle: Path, config_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as handle:
        return subprocess.Popen([str(TLESE), "node", "run", str(bundle), "--config", str(config_path),
                                 "--allow-unsigned"], stdout=handle, stderr=subprocess.STDOUT, env=env)


def states(work: Path) -> list[str]:
    try:
        return [row["state"] for row in read_status(work / "queue.sqlite")]
    except Exception:  # not created yet, or busy
        return []


def test_kill_9_while_processing_then_restart_delivers_each_sr_once(tmp_path, orthanc, node_port, node_bundle_path,
                                                                    cbis_dicoms):
    study_ids = sorted({orthanc.upload(path) for path in cbis_dicoms})
    work = tmp_path / "node"
    config = {"ae_title": "TLESE", "host": "127.0.0.1", "port": node_port, "allowed_calling_aets": ["ORTHANC"],
              "work_dir": str(work), "quiet_seconds": 1, "retention_minutes": 0,
              "destination": {"dimse": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
              "retry": {"first_seconds": 0.5, "max_seconds": 2}}
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))
    echo = subprocess.run([str(TLESE), "node", "echo", "--config", str(config_path)], capture_output=True, text=True)
    assert echo.returncode == 0 and "the destination answered" in echo.stdout  # C-ECHO to Orthanc
    log = tmp_path / "node_stdout.log"
    node = start_node(node_bundle_path, config_path, log)
    try:
        wait_for(lambda: node.poll() is None and _echo(orthanc), 120, "the node to answer C-ECHO")
        orthanc.send("tlese", study_ids)
        wait_for(lambda: "processing" in states(work), 120, "the node to start processing", interval=0.02)
        time.sleep(0.3)
        assert "processing" in states(work), "processing ended before the kill: the test would prove nothing"
        node.send_signal(signal.SIGKILL)
        node.wait(30)
        assert "processing" in states(work)  # killed mid-job: the queue still says so
        node = start_node(node_bundle_path, config_path, log)
        wait_for(lambda: [r["delivery"] for r in read_status(work / "queue.sqlite")] == ["delivered"] * 8, 300,
                 "8 delivered results after the restart")
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
    for path in cbis_dicoms:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        assert len(orthanc.sr_instances(uid)) == 1
    audit = [json.loads(line) for line in (work / "audit.jsonl").read_text().splitlines()]
    assert any(a["event"] == "recovered" for a in audit)
    assert sum(1 for a in audit if a["event"] == "delivered") == 8
    status = subprocess.run([str(TLESE), "node", "status", "--work-dir", str(work)], capture_output=True, text=True,
                            check=True).stdout
    assert status.count("delivered") == 8 and len(status.splitlines()) == 9
    texts = (work / "audit.jsonl").read_text() + (work / "node.log").read_text() + log.read_text() + status
    for path in cbis_dicoms:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientID) not in texts and str(ds.StudyInstanceUID) not in texts


def _echo(orthanc) -> bool:
    try:
        orthanc.post("/modalities/tlese/echo", json={})
        return True
    except Exception:
        return False
