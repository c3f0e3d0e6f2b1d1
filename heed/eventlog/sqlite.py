"""The embedded event log: one SQLite file in WAL mode, every write fsync'ed before it returns."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

from heed.eventlog import IdempotencyConflict
from heed.eventlog.records import (
    CallerThumbs,
    CompletionRecord,
    FeedbackRecord,
    FeedbackSummary,
    LogEntry,
    LoggedPrompt,
)

# Migration N takes the schema from version N to N+1; a database records its version in
# PRAGMA user_version. Append new migrations; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- the log position (watermark)
        type            TEXT NOT NULL CHECK (type IN ('completion', 'feedback')),
        record_id       TEXT NOT NULL UNIQUE,
        completion_id   TEXT NOT NULL,   -- a completion's own id, or the one feedback is on
        kind            TEXT NOT NULL,   -- endpoint of a completion, kind of a feedback
        principal       TEXT NOT NULL,
        policy_version  TEXT NOT NULL,
        created         REAL NOT NULL,
        idempotency_key TEXT,
        content_hash    TEXT,
        body            TEXT NOT NULL    -- the whole record as JSON
    );
    CREATE INDEX events_by_completion ON events (completion_id, type);
    CREATE UNIQUE INDEX feedback_by_idempotency_key
        ON events (principal, idempotency_key) WHERE idempotency_key IS NOT NULL;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's lock before it fails
MIN_FREE_BYTES = 16 << 20  # below this much free disk, the log is not writable (check_writable)


def _connect(path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it returns, so an acknowledged write survives SIGKILL
    # and power loss alike (NORMAL in WAL mode may lose the last commits on power loss).
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version it started from."""
    (current,) = conn.execute("PRAGMA user_version").fetchone()
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"event log schema version {current} is newer than this heed ({SCHEMA_VERSION}); upgrade heed"
        )
    for version in range(current, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return current


def _entry(row: tuple[int, str, str]) -> LogEntry:
    seq, type_, body = row
    data = json.loads(body)
    record = CompletionRecord.from_json(data) if type_ == "completion" else FeedbackRecord.from_json(data)
    return LogEntry(seq=seq, record=record)


class SQLiteEventStore:
    """The EventStore on SQLite. Safe to share between threads; one writer at a time."""

    def __init__(self, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer = _connect(path, busy_timeout_s)
        migrate(self._writer)
        self._reader = _connect(path)

    def append_completion(self, record: CompletionRecord) -> int:
        with self._write_lock:
            cursor = self._writer.execute(
                "INSERT INTO events (type, record_id, completion_id, kind, principal, policy_version,"
                " created, body) VALUES ('completion', ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.completion_id,
                    record.completion_id,
                    record.endpoint,
                    record.principal,
                    record.policy_version,
                    record.created,
                    json.dumps(record.to_json()),
                ),
            )
            return int(cursor.lastrowid or 0)

    def append_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        content_hash = record.content_hash()
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                if record.idempotency_key is not None:
                    row = self._writer.execute(
                        "SELECT content_hash, body FROM events WHERE principal = ? AND idempotency_key = ?",
                        (record.principal, record.idempotency_key),
                    ).fetchone()
                    if row is not None:
                        self._writer.execute("COMMIT")
                        if row[0] != content_hash:
                            raise IdempotencyConflict(record.idempotency_key)
                        return FeedbackRecord.from_json(json.loads(row[1])), False
                self._writer.execute(
                    "INSERT INTO events (type, record_id, completion_id, kind, principal, policy_version,"
                    " created, idempotency_key, content_hash, body)"
                    " VALUES ('feedback', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.feedback_id,
                        record.completion_id,
                        record.kind,
                        record.principal,
                        record.policy_version,
                        record.created,
                        record.idempotency_key,
                        content_hash,
                        json.dumps(record.to_json()),
                    ),
                )
                self._writer.execute("COMMIT")
            except IdempotencyConflict:
                raise
            except BaseException:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                raise
            return record, True

    def check_writable(self) -> None:
        free = shutil.disk_usage(self.path.parent).free
        if free < MIN_FREE_BYTES:
            raise sqlite3.OperationalError(f"database or disk is full: {free} bytes free beside {self.path}")
        with self._write_lock:
            (version,) = self._writer.execute("PRAGMA user_version").fetchone()
            # Rewriting the header's user_version (unchanged) is a real page write and fsync'ed commit.
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.execute(f"PRAGMA user_version = {int(version)}")
                self._writer.execute("COMMIT")
            except BaseException:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                raise

    def get_completion(self, completion_id: str) -> CompletionRecord | None:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT body FROM events WHERE type = 'completion' AND completion_id = ?", (completion_id,)
            ).fetchone()
        return CompletionRecord.from_json(json.loads(row[0])) if row else None

    def feedback_for(self, completion_id: str) -> list[FeedbackRecord]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT body FROM events WHERE type = 'feedback' AND completion_id = ? ORDER BY seq",
                (completion_id,),
            ).fetchall()
        return [FeedbackRecord.from_json(json.loads(body)) for (body,) in rows]

    def read(self, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT seq, type, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [_entry(row) for row in rows]

    def last_seq(self) -> int:
        with self._read_lock:
            (seq,) = self._reader.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(seq)

    def thumb_counts(self) -> dict[str, tuple[int, int]]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT policy_version,"
                " SUM(json_extract(body, '$.thumb') = 1), SUM(json_extract(body, '$.thumb') = -1)"
                " FROM events WHERE type = 'feedback' AND kind = 'thumb' GROUP BY policy_version"
            ).fetchall()
        return {version: (int(up or 0), int(down or 0)) for version, up, down in rows}

    def feedback_summary(self, after: int = 0) -> dict[str, FeedbackSummary]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT policy_version,"
                " SUM(kind = 'thumb' AND json_extract(body, '$.thumb') = 1),"
                " SUM(kind = 'thumb' AND json_extract(body, '$.thumb') = -1),"
                " SUM(kind = 'rating'), SUM(CASE WHEN kind = 'rating' THEN json_extract(body, '$.rating') END),"
                " COUNT(*), SUM(kind = 'ranking'), SUM(kind = 'correction')"
                " FROM events WHERE type = 'feedback' AND seq > ? GROUP BY policy_version",
                (after,),
            ).fetchall()
        names = ("thumbs_up", "thumbs_down", "ratings", "rating_sum", "events", "rankings", "corrections")
        return {row[0]: FeedbackSummary(**{k: v or 0 for k, v in zip(names, row[1:], strict=True)}) for row in rows}

    def thumb_votes(self, after: int = 0) -> list[CallerThumbs]:
        # A thumb's caller is the completion's end user under the principal that owns both
        # (feedback is accepted only from a completion's owner).
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT policy_version, principal, user, SUM(thumb = 1), SUM(thumb = -1) FROM ("
                "  SELECT f.policy_version, f.principal, json_extract(c.body, '$.user') AS user,"
                "   json_extract(f.body, '$.thumb') AS thumb,"
                "   ROW_NUMBER() OVER (PARTITION BY f.principal, f.completion_id,"
                "    json_extract(f.body, '$.choice_index') ORDER BY f.seq DESC) AS latest"
                "  FROM events f JOIN events c ON c.completion_id = f.completion_id AND c.type = 'completion'"
                "  WHERE f.type = 'feedback' AND f.kind = 'thumb' AND f.seq > ?"
                ") WHERE latest = 1 GROUP BY policy_version, principal, user",
                (after,),
            ).fetchall()
        return [CallerThumbs(v, p, u, int(up or 0), int(down or 0)) for v, p, u, up, down in rows]

    def prompts(self, principal: str | None = None, limit: int = 100) -> list[LoggedPrompt]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT json_extract(body, '$.prompt') AS p, json_extract(body, '$.messages') AS m,"
                " COUNT(*), MAX(seq) AS last FROM events"
                " WHERE type = 'completion' AND (? IS NULL OR principal = ?)"
                " GROUP BY p, m ORDER BY last DESC LIMIT ?",
                (principal, principal, limit),
            ).fetchall()
        return [
            LoggedPrompt(prompt, tuple(json.loads(messages)) if messages else None, int(times), int(last))
            for prompt, messages, times, last in rows
        ]

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()
