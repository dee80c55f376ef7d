"""The node's durable work queue: one SQLite file (WAL) in the work folder, every step one transaction.

Tables (keys are salted pseudonyms from `tlese.predict.pipeline.exam_key`; no name, ID, UID or accession number):

    instances(instance_key, study_key, patient_key, sha256, path, received_at, deleted)
    studies(study_key, patient_key, state, revision, claimed_revision, last_received, updated_at, note)
    results(result_id, study_key, revision, sr_path, sop_uid, series_uid, summary, state, attempts, next_try,
            delivered_at, error)
    ignored(study_key, reason)       -- one audit line per ignored study and reason
    watched(study_key, instances)    -- what the DICOMweb watcher last saw of a study

Study states: receiving (waiting to be quiet) -> processing -> done; `ignored` (nothing usable). An instance that
arrives for a done study starts a new revision (receiving again); one that arrives while processing marks the
revision dirty, so the study is processed again afterwards. A result is pending until delivered. After a kill,
`recover()` puts processing studies back to receiving: nothing is lost and nothing is recorded twice.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_key TEXT PRIMARY KEY, study_key TEXT NOT NULL, patient_key TEXT NOT NULL, sha256 TEXT NOT NULL,
    path TEXT NOT NULL, received_at REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_key);
CREATE TABLE IF NOT EXISTS studies (
    study_key TEXT PRIMARY KEY, patient_key TEXT NOT NULL, state TEXT NOT NULL, revision INTEGER NOT NULL,
    claimed_revision INTEGER, last_received REAL NOT NULL, updated_at REAL NOT NULL, note TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS results (
    result_id INTEGER PRIMARY KEY, study_key TEXT NOT NULL, revision INTEGER NOT NULL, sr_path TEXT NOT NULL,
    sop_uid TEXT NOT NULL, series_uid TEXT NOT NULL, summary TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL, delivered_at REAL, error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, UNIQUE(study_key, revision));
CREATE TABLE IF NOT EXISTS ignored (study_key TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY(study_key, reason));
CREATE TABLE IF NOT EXISTS watched (study_key TEXT PRIMARY KEY, instances INTEGER NOT NULL);
"""

STATUS_QUERY = (
    "SELECT s.study_key, s.state, s.revision, s.note, s.updated_at, "
    "(SELECT COUNT(*) FROM instances i WHERE i.study_key = s.study_key) AS images, "
    "(SELECT COUNT(*) FROM instances i WHERE i.study_key = s.study_key AND i.deleted = 0) AS on_disk, "
    "r.revision AS result_revision, r.state AS delivery, r.attempts, r.summary, r.error "
    "FROM studies s LEFT JOIN results r ON r.result_id = (SELECT MAX(result_id) FROM results x "
    "WHERE x.study_key = s.study_key) ORDER BY s.updated_at")


@dataclass(frozen=True)
class Job:
    """Studies of one patient processed together (so a breast's views in two studies still pair, as in predict).

    studies: {study_key: revision claimed}; inputs: every image of the patient still on disk, (path, sha256)."""

    patient_key: str
    studies: dict[str, int]
    inputs: list[tuple[str, str]]


@dataclass(frozen=True)
class Result:
    result_id: int
    study_key: str
    revision: int
    sr_path: str
    sop_uid: str
    series_uid: str
    summary: str
    state: str
    attempts: int


class WorkQueue:
    """The SQLite queue at `path`; safe to use from several threads (one connection per thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- intake ------------------------------------------------------------------------------------------------

    def known_sha256(self, instance_key: str) -> str | None:
        row = self._db().execute("SELECT sha256 FROM instances WHERE instance_key = ?", (instance_key,)).fetchone()
        return row["sha256"] if row else None

    def add_instance(self, instance_key: str, study_key: str, patient_key: str, sha256: str, path: str,
                     now: float) -> str:
        """Record a received image (its file already written). Returns "new", "changed" (same SOP instance, new
        content) or "duplicate" (already had it: nothing changes)."""
        with self._transaction() as db:
            row = db.execute("SELECT sha256 FROM instances WHERE instance_key = ?", (instance_key,)).fetchone()
            if row is not None and row["sha256"] == sha256:
                return "duplicate"
            db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, 0)",
                       (instance_key, study_key, patient_key, sha256, path, now))
            study = db.execute("SELECT state FROM studies WHERE study_key = ?", (study_key,)).fetchone()
            if study is None:
                db.execute("INSERT INTO studies VALUES (?, ?, 'receiving', 1, NULL, ?, ?, '')",
                           (study_key, patient_key, now, now))
            else:  # done / ignored: a new revision; processing: dirty (processed again afterwards)
                db.execute("UPDATE studies SET revision = revision + (state IN ('done', 'ignored') OR (state = "
                           "'processing' AND revision = claimed_revision)), state = CASE state WHEN 'processing' "
                           "THEN 'processing' ELSE 'receiving' END, patient_key = ?, last_received = ?, "
                           "updated_at = ? WHERE study_key = ?", (patient_key, now, now, study_key))
            return "new" if row is None else "changed"

    def note_ignored(self, study_key: str, reason: str, now: float) -> bool:
        """Record that a study (or part of it) is ignored; True the first time for this study and reason."""
        with self._transaction() as db:
            cursor = db.execute("INSERT OR IGNORE INTO ignored VALUES (?, ?, ?)", (study_key, reason, now))
            if cursor.rowcount and db.execute("SELECT 1 FROM studies WHERE study_key = ?", (study_key,)).fetchone() \
                    is None:
                db.execute("INSERT INTO studies VALUES (?, '', 'ignored', 0, NULL, ?, ?, ?)",
                           (study_key, now, now, reason))
            return bool(cursor.rowcount)

    def watched_count(self, study_key: str) -> int | None:
        row = self._db().execute("SELECT instances FROM watched WHERE study_key = ?", (study_key,)).fetchone()
        return None if row is None else int(row["instances"])

    def set_watched(self, study_key: str, instances: int) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO watched VALUES (?, ?)", (study_key, instances))

    # -- processing ----------------------------------------------------------------------------------------------

    def recover(self, now: float) -> int:
        """After a restart: studies caught processing go back to receiving (processed again, same result UIDs)."""
        with self._transaction() as db:
            return db.execute("UPDATE studies SET state = 'receiving', claimed_revision = NULL, updated_at = ? "
                              "WHERE state = 'processing'", (now,)).rowcount

    def claim(self, now: float, quiet_seconds: float, limit: int = 64) -> list[Job]:
        """Studies due (no image of their patient for `quiet_seconds`), claimed as processing, one Job per patient."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT s.study_key, s.patient_key, s.revision FROM studies s WHERE s.state = 'receiving' AND "
                "(SELECT MAX(last_received) FROM studies p WHERE p.patient_key = s.patient_key) <= ? "
                "ORDER BY s.last_received LIMIT ?", (now - quiet_seconds, limit)).fetchall()
            jobs: dict[str, dict[str, int]] = {}
            for row in rows:
                jobs.setdefault(row["patient_key"], {})[row["study_key"]] = row["revision"]
                db.execute("UPDATE studies SET state = 'processing', claimed_revision = revision, updated_at = ? "
                           "WHERE study_key = ?", (now, row["study_key"]))
            out = []
            for patient, studies in jobs.items():
                inputs = db.execute("SELECT path, sha256 FROM instances WHERE patient_key = ? AND deleted = 0 "
                                    "ORDER BY instance_key", (patient,)).fetchall()
                out.append(Job(patient, studies, [(r["path"], r["sha256"]) for r in inputs]))
            return out

    def finish(self, outcomes: list[tuple[str, int, dict | None, str]], now: float) -> None:
        """Record a job's outcome in one transaction: per claimed study (study_key, revision, result or None,
        note). A result waits for delivery; a study that received images meanwhile goes back to receiving."""
        with self._transaction() as db:
            for study_key, revision, result, note in outcomes:
                if result is not None:
                    db.execute("INSERT OR IGNORE INTO results (study_key, revision, sr_path, sop_uid, series_uid, "
                               "summary, state, next_try, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                               (study_key, revision, result["sr_path"], result["sop_uid"], result["series_uid"],
                                result["summary"], now, now))
                db.execute("UPDATE studies SET state = CASE WHEN revision > ? THEN 'receiving' ELSE 'done' END, "
                           "claimed_revision = NULL, updated_at = ?, note = ? WHERE study_key = ?",
                           (revision, now, note, study_key))

    def previous_result(self, study_key: str, revision: int) -> Result | None:
        row = self._db().execute("SELECT * FROM results WHERE study_key = ? AND revision < ? ORDER BY revision DESC "
                                 "LIMIT 1", (study_key, revision)).fetchone()
        return _result(row) if row else None

    # -- delivery and retention ----------------------------------------------------------------------------------

    def due_results(self, now: float) -> list[Result]:
        rows = self._db().execute("SELECT * FROM results WHERE state = 'pending' AND next_try <= ? ORDER BY result_id",
                                  (now,)).fetchall()
        return [_result(row) for row in rows]

    def delivered(self, result_id: int, now: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE results SET state = 'delivered', attempts = attempts + 1, delivered_at = ?, error = '' "
                       "WHERE result_id = ?", (now, result_id))

    def failed(self, result_id: int, error: str, next_try: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE results SET attempts = attempts + 1, next_try = ?, error = ? WHERE result_id = ?",
                       (next_try, error, result_id))

    def expired_instances(self, now: float, retention_seconds: float) -> list[tuple[str, str]]:
        """(instance_key, path) of images whose study is done and whose every result was delivered at least
        `retention_seconds` ago."""
        rows = self._db().execute(
            "SELECT i.instance_key, i.path FROM instances i JOIN studies s ON s.study_key = i.study_key "
            "WHERE i.deleted = 0 AND s.state = 'done' AND EXISTS (SELECT 1 FROM results r WHERE r.study_key = "
            "s.study_key) AND NOT EXISTS (SELECT 1 FROM results r WHERE r.study_key = s.study_key AND "
            "(r.state != 'delivered' OR r.delivered_at > ?))", (now - retention_seconds,)).fetchall()
        return [(row["instance_key"], row["path"]) for row in rows]

    def mark_deleted(self, instance_keys: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE instances SET deleted = 1 WHERE instance_key = ?", [(k,) for k in instance_keys])

    # -- status --------------------------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """One row per study: key, state, revision, images (on disk / received), latest result and its delivery."""
        rows = self._db().execute(STATUS_QUERY).fetchall()
        return [dict(row) for row in rows]

    def count_results(self, state: str | None = None) -> int:
        query = "SELECT COUNT(*) FROM results" + (" WHERE state = ?" if state else "")
        return int(self._db().execute(query, (state,) if state else ()).fetchone()[0])


def read_status(path: str | Path) -> list[dict]:
    """`WorkQueue.status()` of the queue file at `path`, opened read-only (a running node is not disturbed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no node queue here (is this the node's work_dir?)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute(STATUS_QUERY).fetchall()]
    finally:
        db.close()


def _result(row: sqlite3.Row) -> Result:
    return Result(row["result_id"], row["study_key"], row["revision"], row["sr_path"], row["sop_uid"],
                  row["series_uid"], row["summary"], row["state"], row["attempts"])


__all__ = ["Job", "Result", "WorkQueue", "read_status"]
