"""The durable feedback journal: one SQLite database (WAL mode) under ``--alchemist-state-dir``.

Every accepted feedback is committed here *before* its 202 is sent, with the token ids needed
to train it by recomputation, so nothing a user sent is lost to a crash. Both SGLang processes
open the file: the HTTP process inserts records, the scheduler process moves them along::

    queued --(its step is in a published version N)--> trained (trained_version = N)
    queued --(cannot or must not be trained)---------> dropped (reason)

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
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_state ON feedback(state);
"""

STATES = ("queued", "trained", "dropped")


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
    served_version: int | None
    state: str = "queued"
    trained_version: int | None = None
    reason: str | None = None
    created_at: float = 0.0

    def public(self) -> dict:
        return {
            "id": self.feedback_id,
            "completion_id": self.completion_id,
            "type": self.kind,
            "objective": self.objective,
            "weight": self.weight,
            "state": self.state,
            "trained_version": self.trained_version,
            "reason": self.reason,
            "prompt_tokens": len(self.prompt_ids),
            "target_tokens": len(self.target_ids),
            "created_at": self.created_at,
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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, record: FeedbackRecord) -> FeedbackRecord:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO feedback (feedback_id, completion_id, kind, objective, weight, request_digest, "
                "prompt_ids, target_ids, served_version, state, trained_version, reason, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.feedback_id, record.completion_id, record.kind, record.objective, record.weight,
                 record.request_digest, json.dumps(record.prompt_ids), json.dumps(record.target_ids),
                 record.served_version, record.state, record.trained_version, record.reason, now, now),
            )
        record.created_at = now
        return record

    def by_completion(self, completion_id: str) -> FeedbackRecord | None:
        return self._one("SELECT * FROM feedback WHERE completion_id = ?", (completion_id,))

    def by_id(self, feedback_id: str) -> FeedbackRecord | None:
        return self._one("SELECT * FROM feedback WHERE feedback_id = ?", (feedback_id,))

    def queued(self) -> list[FeedbackRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM feedback WHERE state = 'queued' ORDER BY seq").fetchall()
        return [_record(row) for row in rows]

    def mark_trained(self, feedback_ids: list[str], version: int) -> None:
        self._update(feedback_ids, "trained", version, None)

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
        reason=row["reason"], created_at=row["created_at"],
    )


def journal_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "feedback.sqlite3"
