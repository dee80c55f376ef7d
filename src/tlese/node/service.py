"""The node itself: intake (push and pull) into the queue, each quiet study through the bundle's own predict path,
results made idempotent and delivered with retries, received images deleted after delivery.

Work folder layout (`NodeConfig.work_dir`):

    queue.sqlite            the durable queue (tlese.node.queue)
    .salt                   secret of the pseudonymous keys (owner-only)
    images/<study>/<instance>.dcm   received images, until delivered + retention
    jobs/<job>/             a predict run in progress (tlese.predict.pipeline layout), removed when recorded
    results/<study>_r<revision>.dcm the SR to deliver (deterministic UIDs), kept
    audit.jsonl             one JSON line per event, keyed by study key only
    node.log                the log (no header values)

Exactly once: every transition is one SQLite transaction, and a result's SOP Instance UID is derived from the
study, the bundle hash and the hashes of the images that made it, so a result recomputed or resent after a kill is
the same object to the PACS (which then keeps one copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tlese.files import write_bytes_atomic
from tlese.node.config import NodeConfig
from tlese.node.deliver import DeliveryError, make_sender
from tlese.node.queue import Job, WorkQueue
from tlese.predict.inputs import cbis_patient
from tlese.predict.pipeline import exam_key, make_predictor, predict
from tlese.predict.prepare import Preparer

log = logging.getLogger(__name__)

QUEUE_FILE, SALT_FILE, AUDIT_FILE, LOG_FILE = "queue.sqlite", ".salt", "audit.jsonl", "node.log"
IMAGES_DIR, JOBS_DIR, RESULTS_DIR = "images", "jobs", "results"


class AuditLog:
    """Append-only JSON lines: time, event and pseudonymous keys / counts / fixed reasons only."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, sort_keys=False)
        with self._lock, open(self.path, "a") as handle:
            handle.write(line + "\n")
        log.info("%s", line)


def _salt(work_dir: Path) -> str:
    path = work_dir / SALT_FILE
    if not path.is_file():
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass
    return path.read_text().strip()


class Node:
    """A DICOM node serving `bundle` (a loaded `tlese.bundle.format.Bundle`) as configured.

    `start()` opens the intake (SCP, watcher) and recovers after a kill; `run()` loops until `stop()`; `step()`
    does one round of work (claim quiet studies, predict, deliver, clean up) and says whether it did anything."""

    def __init__(self, config: NodeConfig, bundle: Any):
        self.config, self.bundle = config, bundle
        self.work = Path(config.work_dir)
        for name in (IMAGES_DIR, JOBS_DIR, RESULTS_DIR):
            (self.work / name).mkdir(parents=True, exist_ok=True)
        self.salt = _salt(self.work)
        self.queue = WorkQueue(self.work / QUEUE_FILE)
        self.audit = AuditLog(self.work / AUDIT_FILE)
        self.sender = make_sender(config)
        self.predictor = make_predictor(bundle, config.runtime, self.work / "onnx")
        if config.processes < 0:
            raise ValueError(f"processes {config.processes}: give 0 or more")
        self.preparer = Preparer(config.processes)
        self.watcher = None
        self._server = None
        self._next_poll = 0.0
        self._stopping = threading.Event()

    # -- keys ------------------------------------------------------------------------------------------------------

    def study_key(self, study_uid: str) -> str:
        """The pseudonymous study key (the same key `tlese predict` names this study's SR file with)."""
        return exam_key(self.salt, f"study|{study_uid}")

    def instance_key(self, sop_uid: str) -> str:
        return exam_key(self.salt, f"instance|{sop_uid}")

    # -- intake ----------------------------------------------------------------------------------------------------

    def intake(self, data: bytes, source: str) -> str:
        """Keep one received DICOM file (bytes): "new", "changed", "duplicate" or "ignored". Raises ValueError for
        a file whose header cannot be read or that lacks its UIDs (the sender is told it was not understood)."""
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            study_uid, sop_uid = str(ds.get("StudyInstanceUID") or ""), str(ds.get("SOPInstanceUID") or "")
        except Exception:
            self.audit("refused_instance", source=source, reason="DICOM header could not be read")
            raise ValueError("DICOM header could not be read") from None
        if not study_uid or not sop_uid:
            self.audit("refused_instance", source=source, reason="no StudyInstanceUID or SOPInstanceUID")
            raise ValueError("no StudyInstanceUID or SOPInstanceUID")
        study = self.study_key(study_uid)
        now = time.time()
        modality = re.sub(r"[^A-Z0-9_ ]", "?", str(ds.get("Modality") or "").upper())[:16]  # a code, never free text
        intent = str(ds.get("PresentationIntentType") or "").upper()
        reason = (f"modality {modality or 'missing'} is not MG" if modality != "MG"
                  else "FOR PROCESSING image (only FOR PRESENTATION images are read)" if intent == "FOR PROCESSING"
                  else None)
        if reason is not None:
            if self.queue.note_ignored(study, reason, now):
                self.audit("ignored", study=study, source=source, reason=reason)
            return "ignored"
        instance = self.instance_key(sop_uid)
        digest = hashlib.sha256(data).hexdigest()
        if self.queue.known_sha256(instance) == digest:
            self.audit("duplicate", study=study, source=source)
            return "duplicate"
        # The patient as predict groups it (a CBIS-DDSM case name is one view of patient P_xxxxx), so the studies of
        # one woman are predicted together and her breasts' views pair exactly as `tlese predict` pairs them.
        patient_id = str(ds.get("PatientID") or "")
        patient_id = f"cbis:{cbis_patient(patient_id)}" if cbis_patient(patient_id) else patient_id
        patient = exam_key(self.salt, f"patient|{patient_id}") if patient_id else study
        path = self.work / IMAGES_DIR / study / f"{instance}.dcm"
        write_bytes_atomic(path, data)
        outcome = self.queue.add_instance(instance, study, patient, digest, str(path), now)
        self.audit("received", study=study, source=source, outcome=outcome)
        return outcome

    def _rejected(self, calling_ae: str, why: str) -> None:
        self.audit("association_rejected", calling_ae=calling_ae, reason=why)

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.queue.recover(time.time())
        if recovered:
            self.audit("recovered", studies=recovered, reason="processing was interrupted: processed again")
        if self.config.port:
            from tlese.node.scp import start_scp

            self._server = start_scp(self.config, self.intake, self._rejected)
            log.info("C-STORE SCP %s listening on %s:%d", self.config.ae_title, self.config.host,
                     self._server.server_address[1])
        if self.config.watch is not None:
            from tlese.node.watcher import Watcher

            self.watcher = Watcher(self.config.watch, self.queue, self.intake, self.study_key, self.instance_key)
        self.audit("started", bundle_sha256=self.bundle.sha256, ae_title=self.config.ae_title)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    def run(self, idle_seconds: float = 0.2) -> None:
        """Work until `stop()` (from another thread or a signal handler)."""
        while not self._stopping.is_set():
            if not self.step():
                self._stopping.wait(idle_seconds)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.preparer.close()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.audit("stopped")

    # -- one round of work -----------------------------------------------------------------------------------------

    def step(self) -> bool:
        did = False
        now = time.time()
        if self.watcher is not None and now >= self._next_poll:
            self._next_poll = now + self.config.watch_interval_seconds
            try:
                did |= self.watcher.poll() > 0
            except Exception as error:  # the server down or answering nonsense: try again next interval
                log.warning("watch: DICOMweb poll failed (%s)", type(error).__name__)
        for job in self.queue.claim(time.time(), self.config.quiet_seconds):
            self._process(job)
            self._deliver()  # each result leaves as soon as it is made
            did = True
        did |= self._deliver()
        did |= self._clean()
        return did

    def _process(self, job: Job) -> None:
        name = hashlib.sha256(json.dumps([job.patient_key, sorted(job.studies.items())]).encode()).hexdigest()[:16]
        folder = self.work / JOBS_DIR / name
        self.audit("processing", studies=sorted(job.studies), images=len(job.inputs))
        started = time.time()
        outcomes = []
        try:
            predict(self.bundle, [path for path, _ in job.inputs], folder, salt=self.salt, sr=True,
                    predictor=self.predictor, preparer=self.preparer)
            hashes = sorted(digest for _, digest in job.inputs)
            for study, revision in sorted(job.studies.items()):
                sr = folder / "sr" / f"{study}.dcm"
                if sr.is_file():
                    outcomes.append((study, revision, self._finalize(sr, study, revision, hashes), ""))
                else:
                    outcomes.append((study, revision, None, "no result: no readable image in this study"))
        except Exception as error:  # recorded (not retried forever); the images stay for a manual look
            log.exception("processing failed")
            outcomes = [(study, revision, None, f"failed: {type(error).__name__}")
                        for study, revision in job.studies.items()]
        self.queue.finish(outcomes, time.time())
        seconds = round(time.time() - started, 3)
        for study, revision, result, note in outcomes:
            self.audit("result" if result else "no_result", study=study, revision=revision, seconds=seconds,
                       **({"summary": result["summary"]} if result else {"reason": note}))
        shutil.rmtree(folder, ignore_errors=True)

    def _finalize(self, sr_path: Path, study: str, revision: int, hashes: list[str]) -> dict:
        """The SR `predict` wrote, made idempotent: Series / SOP Instance UIDs derived from (study, bundle hash,
        input hashes), the revision as instance number, and a reference to the study's previous result."""
        from tlese.predict.sr import read_sr

        ds = pydicom.dcmread(sr_path)
        study_uid, sha = str(ds.StudyInstanceUID), str(self.bundle.sha256)
        series_uid = generate_uid(entropy_srcs=["tlese-node-series", study_uid, sha])
        sop_uid = generate_uid(entropy_srcs=["tlese-node-sr", study_uid, sha, *hashes])
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, sop_uid, revision
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        previous = self.queue.previous_result(study, revision)
        if previous is not None and previous.sop_uid != sop_uid:
            ds.PredecessorDocumentsSequence = [_reference(study_uid, previous.series_uid, str(ds.SOPClassUID),
                                                          previous.sop_uid)]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out = self.work / RESULTS_DIR / f"{study}_r{revision}.dcm"
        write_bytes_atomic(out, buffer.getvalue())
        breasts = read_sr(out)["breasts"]
        summary = ", ".join(f"{side} {breasts[side]['verdict']}" for side in sorted(breasts))
        return {"sr_path": str(out), "sop_uid": sop_uid, "series_uid": series_uid,
                "summary": summary + (" (replaces the previous result)" if previous is not None else "")}

    def _deliver(self) -> bool:
        due = self.queue.due_results(time.time())
        for result in due:
            try:
                self.sender.send(result.sr_path)
            except (DeliveryError, OSError) as error:
                delay = min(self.config.retry_max_seconds, self.config.retry_first_seconds * 2 ** result.attempts)
                reason = str(error) if isinstance(error, DeliveryError) else f"{type(error).__name__}"
                self.queue.failed(result.result_id, reason, time.time() + delay)
                self.audit("delivery_failed", study=result.study_key, revision=result.revision,
                           attempt=result.attempts + 1, retry_in_seconds=round(delay, 1), reason=reason)
                continue
            self.queue.delivered(result.result_id, time.time())
            self.audit("delivered", study=result.study_key, revision=result.revision, attempt=result.attempts + 1)
        return bool(due)

    def _clean(self) -> bool:
        expired = self.queue.expired_instances(time.time(), self.config.retention_minutes * 60)
        if not expired:
            return False
        for _, path in expired:
            Path(path).unlink(missing_ok=True)
            try:
                Path(path).parent.rmdir()
            except OSError:
                pass  # other images of the study still there
        self.queue.mark_deleted([key for key, _ in expired])
        studies: dict[str, int] = {}
        for _, path in expired:
            studies[Path(path).parent.name] = studies.get(Path(path).parent.name, 0) + 1
        for study, count in sorted(studies.items()):
            self.audit("images_deleted", study=study, images=count)
        return True


def _reference(study_uid: str, series_uid: str, sop_class: str, sop_uid: str) -> Dataset:
    """A Predecessor Documents Sequence item (study > series > SOP)."""
    sop, series, item = Dataset(), Dataset(), Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = sop_class, sop_uid
    series.SeriesInstanceUID, series.ReferencedSOPSequence = series_uid, [sop]
    item.StudyInstanceUID, item.ReferencedSeriesSequence = study_uid, [series]
    return item


def setup_logging(work_dir: Path, level: int = logging.INFO) -> None:
    """Log to stderr and work_dir/node.log; pynetdicom's own chatter (which names UIDs) kept at warnings."""
    root = logging.getLogger()
    root.setLevel(level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in (logging.StreamHandler(), logging.FileHandler(Path(work_dir) / LOG_FILE)):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


__all__ = ["AuditLog", "Node", "setup_logging"]
