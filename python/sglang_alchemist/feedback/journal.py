"""The durable feedback journal: one SQLite database (WAL mode) under ``--alchemist-state-dir``.

Every accepted feedback is committed here *before* its 202 is sent, with the token ids needed
to train it by recomputation, so nothing a user sent is lost to a crash. Both SGLang processes
open the file: the HTTP process inserts records, the scheduler process moves them along::

    queued --(its update is in a published version N)--> trained (trained_version = N)
    queued --(its update failed the publish gate)------> rejected (reason)
    queued --(cannot or must not be trained)-----------> dropped (reason)

Each record also says what its latest update did (``note_updates``, written when the update
ends, before it is published): ``steps`` (optimizer steps), ``learnt`` (whether the check after
the last step found the model giving the feedback's answer; NULL for an accept, which is one
reinforcing step), ``stop_reason`` (``learnt``, ``max_steps``, ``max_seconds``) and ``gate_probes``
(how many probes the publish gate checked before publishing it: 0 when none fell in the
candidate version's scope, i.e. the gate had nothing to check).

A record becomes ``trained`` only when the version containing its update is checkpointed, so
after a crash (even ``kill -9`` mid-step) every record not in a checkpoint is still
``queued`` and is trained again at restart - at-least-once, never lost.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    feedback_id TEXT NOT NULL UNIQUE,
    completion_id TEXT UNIQUE,
    kind TEXT NOT NULL,
    objective TEXT NOT NULL,
    weight REAL NOT NULL,
    request_digest TEXT NOT NULL,
    prompt_ids TEXT NOT NULL,
    target_ids TEXT NOT NULL,
    served_version INTEGER,
    state TEXT NOT NULL,
    trained_version INTEGER,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    steps INTEGER,
    learnt INTEGER,
    stop_reason TEXT,
    adapter_applied INTEGER,
    gate_probes INTEGER
);
CREATE INDEX IF NOT EXISTS feedback_state ON feedback(state);
"""
# columns added after the first release: a journal written before them gains them at open
ADDED_COLUMNS = (("steps", "INTEGER"), ("learnt", "INTEGER"), ("stop_reason", "TEXT"), ("adapter_applied", "INTEGER"),
                 ("gate_probes", "INTEGER"))

STATES = ("queued", "trained", "rejected", "dropped")


@dataclass
class FeedbackRecord:
    feedback_id: str
    completion_id: str | None
    kind: str  # accept, correction, reject, external
    objective: str  # sft, unlikelihood, none
    weight: float
    request_digest: str
    prompt_ids: list[int]
    target_ids: list[int]
    served_version: int | None  # the version that served the response (its adapter *and* its scope)
    state: str = "queued"
    trained_version: int | None = None
    reason: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    steps: int | None = None  # optimizer steps of its latest update
    learnt: bool | None = None  # the check after its last step found it learnt (None: not checked)
    stop_reason: str | None = None
    adapter_applied: bool | None = None  # the served version's adapter answered (False: its scope left it to the base)
    gate_probes: int | None = None  # probes the publish gate checked for its latest update (0: none to check)

    def public(self) -> dict:
        return {
            "id": self.feedback_id,
            "completion_id": self.completion_id,
            "type": self.kind,
            "objective": self.objective,
            "weight": self.weight,
            "state": self.state,
            "served_version": self.served_version,
            "adapter_applied": self.adapter_applied,
            "trained_version": self.trained_version,
            "reason": self.reason,
            "prompt_tokens": len(self.prompt_ids),
            "target_tokens": len(self.target_ids),
            "steps": self.steps,
            "learnt": self.learnt,
            "stop_reason": self.stop_reason,
            "gate_probes": self.gate_probes,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only kill -9
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(feedback)").fetchall()}
        for name, kind in ADDED_COLUMNS:
            if name not in present:
                try:
                    self._db.execute(f"ALTER TABLE feedback ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as error:  # another process added it meanwhile
                    if "duplicate column" not in str(error):
                        raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, record: FeedbackRecord) -> FeedbackRecord:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO feedback (feedback_id, completion_id, kind, objective, weight, request_digest, "
                "prompt_ids, target_ids, served_version, state, trained_version, reason, created_at, updated_at, "
                "adapter_applied) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.feedback_id, record.completion_id, record.kind, record.objective, record.weight,
                 record.request_digest, json.dumps(record.prompt_ids), json.dumps(record.target_ids),
                 record.served_version, record.state, record.trained_version, record.reason, now, now,
                 None if record.adapter_applied is None else int(record.adapter_applied)),
            )
        record.created_at = now
        return record

    def by_completion(self, completion_id: str) -> FeedbackRecord | None:
        return self._one("SELECT * FROM feedback WHERE completion_id = ?", (completion_id,))

    def by_id(self, feedback_id: str) -> FeedbackRecord | None:
        """One record (``GET /v1/alchemist/feedback/{id}``: where a user's feedback stands)."""
        return self._one("SELECT * FROM feedback WHERE feedback_id = ?", (feedback_id,))

    def queued(self, created_before: float | None = None) -> list[FeedbackRecord]:
        query, args = "SELECT * FROM feedback WHERE state = 'queued'", ()
        if created_before is not None:
            query, args = query + " AND created_at < ?", (created_before,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq", args).fetchall()
        return [_record(row) for row in rows]

    def trained(self) -> list[FeedbackRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM feedback WHERE state = 'trained' ORDER BY seq").fetchall()
        return [_record(row) for row in rows]

    def mark_trained(self, feedback_ids: list[str], version: int) -> None:
        self._update(feedback_ids, "trained", version, None)

    def note_updates(self, rows: list[tuple[str | None, int, bool | None, str | None, int]]) -> None:
        """``(feedback_id, steps, learnt, stop_reason, gate_probes)`` of an update that just ended
        (the state is unchanged: ``trained`` comes with the version)."""
        rows = [row for row in rows if row[0] is not None]
        if not rows:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE feedback SET steps = ?, learnt = ?, stop_reason = ?, gate_probes = ?, updated_at = ? "
                    "WHERE feedback_id = ?",
                    [(steps, None if learnt is None else int(learnt), reason, probes, now, feedback_id)
                     for feedback_id, steps, learnt, reason, probes in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def mark_rejected(self, feedback_ids: list[str], reason: str) -> None:
        self._update(feedback_ids, "rejected", None, reason)

    def requeue_trained_after(self, version: int) -> int:
        """Feedback trained into versions newer than ``version`` is queued again (those versions
        are gone: an unreadable checkpoint at start-up). Returns how many records."""
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "UPDATE feedback SET state = 'queued', trained_version = NULL, updated_at = ? "
                "WHERE state = 'trained' AND trained_version > ?", (now, version))
            return cursor.rowcount

    def mark_dropped(self, feedback_ids: list[str], reason: str) -> None:
        self._update(feedback_ids, "dropped", None, reason)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM feedback GROUP BY state").fetchall()
        counts = {state: 0 for state in STATES}
        counts.update({row["state"]: row["n"] for row in rows})
        counts["total"] = sum(counts[state] for state in STATES)
        return counts

    def _update(self, feedback_ids: list[str], state: str, version: int | None, reason: str | None) -> None:
        if not feedback_ids:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE feedback SET state = ?, trained_version = ?, reason = ?, updated_at = ? "
                    "WHERE feedback_id = ? AND state = 'queued'",
                    [(state, version, reason, now, feedback_id) for feedback_id in feedback_ids],
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (e.g. SQLITE_FULL) has rolled back already
                    self._db.execute("ROLLBACK")
                raise

    def _one(self, query: str, args: tuple) -> FeedbackRecord | None:
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        return None if row is None else _record(row)


def _record(row: sqlite3.Row) -> FeedbackRecord:
    return FeedbackRecord(
        feedback_id=row["feedback_id"], completion_id=row["completion_id"], kind=row["kind"],
        objective=row["objective"], weight=row["weight"], request_digest=row["request_digest"],
        prompt_ids=json.loads(row["prompt_ids"]), target_ids=json.loads(row["target_ids"]),
        served_version=row["served_version"], state=row["state"], trained_version=row["trained_version"],
        reason=row["reason"], created_at=row["created_at"], updated_at=row["updated_at"],
        steps=row["steps"], learnt=None if row["learnt"] is None else bool(row["learnt"]),
        stop_reason=row["stop_reason"],
        adapter_applied=None if row["adapter_applied"] is None else bool(row["adapter_applied"]),
        gate_probes=row["gate_probes"],
    )


def journal_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "feedback.sqlite3"


# errno values meaning "the storage refused the write", not "the code is wrong"
_STORAGE_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exhausted",
                   "EROFS": "the file system is read-only", "EACCES": "permission denied",
                   "EPERM": "permission denied", "EIO": "an I/O error"}


def storage_failure(error: BaseException) -> str | None:
    """What failed, in words, when ``error`` is the journal's storage failing; else None.

    Storage failures are conditions of the machine, not bugs: SQLite's ``OperationalError``
    ("database or disk is full", "attempt to write a readonly database", "database is locked"
    after the busy timeout, "disk I/O error", "unable to open database file"), a corrupt file
    (``DatabaseError``), and the OS errors behind them (``ENOSPC``, ``EROFS``, ``EIO``...).
    Constraint violations and misuse (``IntegrityError``, ``ProgrammingError``) return None.
    """
    import errno as errno_module

    if isinstance(error, sqlite3.OperationalError):
        message = str(error)
        if "locked" in message or "busy" in message:
            return f"the database is locked by another process or connection ({message})"
        if "full" in message:
            return f"the disk is full ({message})"
        if "readonly" in message or "read-only" in message:
            return f"the database is read-only ({message})"
        return f"SQLite could not write ({message})"
    if type(error) is sqlite3.DatabaseError:
        return f"the database file is unusable ({error})"
    if isinstance(error, OSError) and error.errno is not None:
        name = errno_module.errorcode.get(error.errno, "")
        if name in _STORAGE_ERRNOS:
            return f"{_STORAGE_ERRNOS[name]} ({name}: {error.strerror or error})"
    return None
