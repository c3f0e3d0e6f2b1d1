"""The embedded event log: one SQLite file in WAL mode, every write fsync'ed before it returns."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
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
    # 2: aggregates kept by triggers in the writing transaction, so that the dashboard reads a row
    # per version and per distinct prompt instead of scanning the log.
    """
    CREATE TABLE feedback_totals (
        policy_version TEXT PRIMARY KEY,
        thumbs_up      INTEGER NOT NULL,
        thumbs_down    INTEGER NOT NULL,
        ratings        INTEGER NOT NULL,
        rating_sum     REAL NOT NULL,
        events         INTEGER NOT NULL,
        rankings       INTEGER NOT NULL,
        corrections    INTEGER NOT NULL
    );
    INSERT INTO feedback_totals
        SELECT policy_version,
            TOTAL(kind = 'thumb' AND json_extract(body, '$.thumb') = 1),
            TOTAL(kind = 'thumb' AND json_extract(body, '$.thumb') = -1),
            TOTAL(kind = 'rating'), TOTAL(CASE WHEN kind = 'rating' THEN json_extract(body, '$.rating') END),
            COUNT(*), TOTAL(kind = 'ranking'), TOTAL(kind = 'correction')
        FROM events WHERE type = 'feedback' GROUP BY policy_version;
    CREATE TRIGGER feedback_totals_kept AFTER INSERT ON events WHEN NEW.type = 'feedback'
    BEGIN
        INSERT INTO feedback_totals VALUES (
            NEW.policy_version,
            NEW.kind = 'thumb' AND json_extract(NEW.body, '$.thumb') = 1,
            NEW.kind = 'thumb' AND json_extract(NEW.body, '$.thumb') = -1,
            NEW.kind = 'rating',
            CASE WHEN NEW.kind = 'rating' THEN json_extract(NEW.body, '$.rating') ELSE 0 END,
            1, NEW.kind = 'ranking', NEW.kind = 'correction')
        ON CONFLICT (policy_version) DO UPDATE SET
            thumbs_up = thumbs_up + excluded.thumbs_up, thumbs_down = thumbs_down + excluded.thumbs_down,
            ratings = ratings + excluded.ratings, rating_sum = rating_sum + excluded.rating_sum,
            events = events + 1, rankings = rankings + excluded.rankings,
            corrections = corrections + excluded.corrections;
    END;
    CREATE TABLE prompt_totals (
        principal TEXT NOT NULL,
        key       TEXT NOT NULL,  -- the prompt and the messages, together
        prompt    TEXT,
        messages  TEXT,
        times     INTEGER NOT NULL,
        last      INTEGER NOT NULL,  -- the seq of its latest completion
        PRIMARY KEY (principal, key)
    );
    CREATE INDEX prompt_totals_latest ON prompt_totals (principal, last);
    INSERT INTO prompt_totals
        SELECT principal, json_array(json_extract(body, '$.prompt'), json_extract(body, '$.messages')),
            json_extract(body, '$.prompt'), json_extract(body, '$.messages'), COUNT(*), MAX(seq)
        FROM events WHERE type = 'completion' GROUP BY 1, 2;
    CREATE TRIGGER prompt_totals_kept AFTER INSERT ON events WHEN NEW.type = 'completion'
    BEGIN
        INSERT INTO prompt_totals VALUES (
            NEW.principal, json_array(json_extract(NEW.body, '$.prompt'), json_extract(NEW.body, '$.messages')),
            json_extract(NEW.body, '$.prompt'), json_extract(NEW.body, '$.messages'), 1, NEW.seq)
        ON CONFLICT (principal, key) DO UPDATE SET times = times + 1, last = excluded.last;
    END;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> Iterator[str]:
    """The script's statements, whole (a trigger's body holds semicolons of its own)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending


ID_BATCH = 500  # ids in one IN (...) query: under SQLite's limit of bound variables (999 before 3.32)
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's lock before it fails
MIN_FREE_BYTES = 16 << 20  # below this much free disk, the log is not writable (check_writable)


def _connect(path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    # Turning WAL on takes the file exclusively, and SQLite answers "locked" at once (no busy
    # wait) when another process is opening it too, as two processes starting on a new log do.
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.02)
    # FULL: a commit is on disk before it returns, so an acknowledged write survives SIGKILL
    # and power loss alike (NORMAL in WAL mode may lose the last commits on power loss).
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version it started from. Each step reads the
    version inside its write transaction: processes that open a log at once take turns, and
    none applies a step another has applied."""
    (started,) = conn.execute("PRAGMA user_version").fetchone()
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (current,) = conn.execute("PRAGMA user_version").fetchone()
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"event log schema version {current} is newer than this heed ({SCHEMA_VERSION}); upgrade heed"
                )
            if current == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return started
            for statement in _statements(MIGRATIONS[current]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {current + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


class SQLiteEventStore:
    """The EventStore on SQLite. Safe to share between threads; one writer at a time."""

    writers = 1

    def __init__(self, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._write_lock = threading.Lock()
        self._writer = _connect(path, busy_timeout_s)
        migrate(self._writer)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    def _read(self) -> sqlite3.Connection:
        """This thread's own read connection: in WAL mode readers wait neither for each other
        nor for the writer (one shared connection made every read queue behind the others)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._readers_lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the event store is closed")
                conn = _connect(self.path)
                self._readers.append(conn)
            self._local.conn = conn
        return conn

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
        row = (
            self._read()
            .execute("SELECT body FROM events WHERE type = 'completion' AND completion_id = ?", (completion_id,))
            .fetchone()
        )
        return CompletionRecord.from_json(json.loads(row[0])) if row else None

    def get_completions(self, completion_ids: Iterable[str]) -> dict[str, CompletionRecord]:
        ids = list(dict.fromkeys(completion_ids))
        found: dict[str, CompletionRecord] = {}
        for start in range(0, len(ids), ID_BATCH):
            chunk = ids[start : start + ID_BATCH]
            marks = ",".join("?" * len(chunk))
            rows = (
                self._read()
                .execute(f"SELECT body FROM events WHERE type = 'completion' AND completion_id IN ({marks})", chunk)
                .fetchall()
            )
            for (body,) in rows:
                record = CompletionRecord.from_json(json.loads(body))
                found[record.completion_id] = record
        return found

    def feedback_for(self, completion_id: str) -> list[FeedbackRecord]:
        rows = (
            self._read()
            .execute(
                "SELECT body FROM events WHERE type = 'feedback' AND completion_id = ? ORDER BY seq",
                (completion_id,),
            )
            .fetchall()
        )
        return [FeedbackRecord.from_json(json.loads(body)) for (body,) in rows]

    def read(self, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        rows = (
            self._read()
            .execute("SELECT seq, type, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
            .fetchall()
        )
        return [LogEntry.from_row(*row) for row in rows]

    def last_seq(self) -> int:
        (seq,) = self._read().execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(seq)

    def thumb_counts(self) -> dict[str, tuple[int, int]]:
        rows = self._read().execute("SELECT policy_version, thumbs_up, thumbs_down FROM feedback_totals").fetchall()
        return {version: (int(up), int(down)) for version, up, down in rows if up or down}

    def feedback_summary(self, after: int = 0) -> dict[str, FeedbackSummary]:
        """Per version: the kept totals (``after`` 0: one row per version, whatever the log's
        length), or a scan of the stretch after ``after`` (a canary's: as long as it is young)."""
        if after <= 0:
            rows = (
                self._read()
                .execute(
                    "SELECT policy_version, thumbs_up, thumbs_down, ratings, rating_sum, events, rankings, corrections"
                    " FROM feedback_totals"
                )
                .fetchall()
            )
        else:
            rows = (
                self._read()
                .execute(
                    "SELECT policy_version,"
                    " SUM(kind = 'thumb' AND json_extract(body, '$.thumb') = 1),"
                    " SUM(kind = 'thumb' AND json_extract(body, '$.thumb') = -1),"
                    " SUM(kind = 'rating'), SUM(CASE WHEN kind = 'rating' THEN json_extract(body, '$.rating') END),"
                    " COUNT(*), SUM(kind = 'ranking'), SUM(kind = 'correction')"
                    " FROM events WHERE type = 'feedback' AND seq > ? GROUP BY policy_version",
                    (after,),
                )
                .fetchall()
            )
        names = ("thumbs_up", "thumbs_down", "ratings", "rating_sum", "events", "rankings", "corrections")
        return {row[0]: FeedbackSummary(**{k: v or 0 for k, v in zip(names, row[1:], strict=True)}) for row in rows}

    def thumb_votes(self, after: int = 0) -> list[CallerThumbs]:
        # A thumb's caller is the completion's `evidence_caller` (its `caller`, else its end user,
        # else its principal: heed.callers), under the principal that owns both (feedback is accepted
        # only from a completion's owner). So a key's requests with no `user`, an empty one or users
        # it may not name are one caller, not three.
        rows = (
            self._read()
            .execute(
                "SELECT policy_version, principal, user, SUM(thumb = 1), SUM(thumb = -1) FROM ("
                "  SELECT f.policy_version, f.principal,"
                "   COALESCE(json_extract(c.body, '$.caller'), NULLIF(json_extract(c.body, '$.user'), ''),"
                "    c.principal) AS user,"
                "   json_extract(f.body, '$.thumb') AS thumb,"
                "   ROW_NUMBER() OVER (PARTITION BY f.principal, f.completion_id,"
                "    json_extract(f.body, '$.choice_index') ORDER BY f.seq DESC) AS latest"
                "  FROM events f JOIN events c ON c.completion_id = f.completion_id AND c.type = 'completion'"
                "  WHERE f.type = 'feedback' AND f.kind = 'thumb' AND f.seq > ?"
                ") WHERE latest = 1 GROUP BY policy_version, principal, user",
                (after,),
            )
            .fetchall()
        )
        return [CallerThumbs(v, p, u, int(up or 0), int(down or 0)) for v, p, u, up, down in rows]

    def prompts(self, principal: str | None = None, limit: int = 100) -> list[LoggedPrompt]:
        """Distinct prompts, latest first, from the kept per-prompt totals (not the log)."""
        if principal is not None:
            rows = (
                self._read()
                .execute(
                    "SELECT prompt, messages, times, last FROM prompt_totals WHERE principal = ?"
                    " ORDER BY last DESC LIMIT ?",
                    (principal, limit),
                )
                .fetchall()
            )
        else:
            rows = (
                self._read()
                .execute(
                    "SELECT prompt, messages, SUM(times), MAX(last) AS latest FROM prompt_totals"
                    " GROUP BY key ORDER BY latest DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [
            LoggedPrompt(prompt, tuple(json.loads(messages)) if messages else None, int(times), int(last))
            for prompt, messages, times, last in rows
        ]

    def close(self) -> None:
        with self._write_lock, self._readers_lock:
            self._closed = True
            self._writer.close()
            for conn in self._readers:
                conn.close()
            self._readers.clear()
