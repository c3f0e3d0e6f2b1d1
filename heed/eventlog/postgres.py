"""The shared event log: PostgreSQL, for several serving replicas and a trainer on other nodes.

Every commit is durable before it returns (``synchronous_commit`` on for every connection). The log's
order is its readers' contract: a reader that follows a watermark must never skip an event that
another writer commits later with a smaller position. PostgreSQL hands out a sequence's numbers
in call order, not commit order, so every write holds the log's advisory lock *shared* from
before it draws its position until its transaction ends (writers never wait for each other on
it), and a reader takes it *exclusively* for a moment: then no write is in flight, and every
position drawn so far is committed or rolled back. The reader reads up to that position (the
*horizon*) and no further. Writers still commit side by side (one WAL flush carries many); a
reader waits for the writes in flight, and new writes wait for that moment.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from heed.eventlog import IdempotencyConflict
from heed.eventlog.records import (
    CallerThumbs,
    CompletionRecord,
    FeedbackRecord,
    FeedbackSummary,
    LogEntry,
    LoggedPrompt,
)

# Migration N takes the schema from version N to N+1 (recorded in heed_schema). Append new
# migrations; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE SEQUENCE heed_event_seq CACHE 1;  -- the horizon needs every number drawn in order
    CREATE TABLE events (
        seq             BIGINT PRIMARY KEY,  -- the log position (watermark), in commit order
        type            TEXT NOT NULL CHECK (type IN ('completion', 'feedback')),
        record_id       TEXT NOT NULL UNIQUE,
        completion_id   TEXT NOT NULL,   -- a completion's own id, or the one feedback is on
        kind            TEXT NOT NULL,   -- endpoint of a completion, kind of a feedback
        principal       TEXT NOT NULL,
        policy_version  TEXT NOT NULL,
        created         DOUBLE PRECISION NOT NULL,
        idempotency_key TEXT,
        content_hash    TEXT,
        end_user        TEXT,            -- a completion's `user`
        choice_index    INTEGER,         -- a feedback's
        thumb           SMALLINT,
        rating          SMALLINT,
        prompt_key      TEXT,            -- a completion's prompt and messages, together (JSON)
        body            TEXT NOT NULL    -- the whole record as JSON (text: NUL escapes survive)
    );
    CREATE INDEX events_by_completion ON events (completion_id, type);
    CREATE UNIQUE INDEX feedback_by_idempotency_key
        ON events (principal, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX feedback_totals ON events (policy_version, kind, thumb, rating) WHERE type = 'feedback';
    CREATE TABLE heed_writable (id INTEGER PRIMARY KEY, checked TIMESTAMPTZ NOT NULL);
    -- A write's position. The write holds the log's lock (1751475556, 1) shared until its
    -- transaction ends; writers never wait for each other on it.
    CREATE FUNCTION heed_take_position() RETURNS BIGINT LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(1751475556, 1);
        RETURN nextval('heed_event_seq');
    END $$;
    -- The last position below which every write has committed or rolled back: with the log's
    -- lock held exclusively no write is in flight, so every position drawn so far is settled.
    CREATE FUNCTION heed_horizon() RETURNS BIGINT LANGUAGE plpgsql AS $$
    DECLARE last BIGINT; called BOOLEAN;
    BEGIN
        PERFORM pg_advisory_xact_lock(1751475556, 1);
        SELECT last_value, is_called INTO last, called FROM heed_event_seq;
        RETURN CASE WHEN called THEN last ELSE 0 END;
    END $$;
    """,
    """
    -- Small JSON documents the replicas share (the rollout state), each written by
    -- compare-and-set on its revision (SharedDocument).
    CREATE TABLE heed_documents (
        name     TEXT PRIMARY KEY,
        revision BIGINT NOT NULL,
        body     JSONB NOT NULL,
        updated  TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    """,
    """
    -- A completion's caller when it is not its end_user: the principal, whose key may not name
    -- end users (CompletionRecord.caller). NULL: end_user, else the principal.
    ALTER TABLE events ADD COLUMN caller TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Advisory lock keys, in the two-int form. (1751475556, 1) is the log's lock, written out in the
# functions above.
LOCK_SPACE = 0x68656564  # "heed"
MIGRATION_LOCK = (LOCK_SPACE, 2)
TRAINER_LOCK = (LOCK_SPACE, 3)  # the one trainer of a log
CONTROLLER_LOCK = (LOCK_SPACE, 4)  # the one rollout controller that decides, among the replicas
# A row's columns as the group commit writes them, with their types (seq comes from heed_take_position()).
COLUMNS = (
    ("type", "text"),
    ("record_id", "text"),
    ("completion_id", "text"),
    ("kind", "text"),
    ("principal", "text"),
    ("policy_version", "text"),
    ("created", "float8"),
    ("end_user", "text"),
    ("caller", "text"),
    ("prompt_key", "text"),
    ("idempotency_key", "text"),
    ("content_hash", "text"),
    ("choice_index", "int4"),
    ("thumb", "int2"),
    ("rating", "int2"),
    ("body", "text"),
)
# The group commit's one statement, whatever the batch's size: a row for each element of the
# column arrays (sent in binary), each with its position. The server prepares it once per connection.
INSERT_BATCH = (
    f"INSERT INTO events (seq, {', '.join(name for name, _ in COLUMNS)})"
    f" SELECT heed_take_position(), * FROM unnest({', '.join(f'%b::{kind}[]' for _, kind in COLUMNS)})"
    " ON CONFLICT DO NOTHING RETURNING record_id, seq"
)
MIGRATION_TIMEOUT_MS = 600_000  # how long a start-up migration (or the wait for another's) may take
MAX_BATCH = 256  # rows in one group commit at the most
COMMITTERS = 2  # group commits in flight at once, per store
STATEMENT_TIMEOUT_MS = 5000  # every wait has a limit: a statement, a lock, a free connection
POOL_SIZE = 16
ID_BATCH = 1000  # ids in one = ANY(...) query: each statement well within STATEMENT_TIMEOUT_MS
# A peer gone silent (a node lost, a network cut) is noticed in about 25 s on both ends: by the
# client (libpq's settings), and by the server, which then ends the session and frees its locks.
CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25000,
}
SERVER_KEEPALIVES = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 -c tcp_user_timeout=25000"
)


def _json_messages(record: CompletionRecord) -> str | None:
    return json.dumps(list(record.messages)) if record.messages is not None else None


class PostgresEventStore:
    """The EventStore on PostgreSQL: a pool of connections, safe to share between threads and
    between processes and machines (each its own store on the same database)."""

    writers = 8  # commits that wait for the disk together

    def __init__(self, url: str, pool_size: int = POOL_SIZE, timeout_s: float = STATEMENT_TIMEOUT_MS / 1000) -> None:
        self._pool = _pool(url, timeout_s, pool_size, "heed-eventlog")
        self._closed = threading.Event()
        self._timeout_s = timeout_s
        self.commits = 0  # group commits made (each holds one or more appends)
        try:
            migrate(self._pool)
            with self._pool.connection() as conn:
                row = conn.execute(
                    "SELECT cache_size FROM pg_sequences WHERE sequencename = 'heed_event_seq'"
                ).fetchone()
            if not row or int(row[0]) != 1:
                raise RuntimeError("heed_event_seq must have CACHE 1: its numbers must be drawn in order")
        except BaseException:
            self._pool.close(timeout=1)
            raise
        self._start_committers(COMMITTERS)

    # ---- writing -------------------------------------------------------------------------------
    # A group commit: the appends that wait at one moment go into one multi-row INSERT, in
    # autocommit: one transaction, one round trip, one WAL flush, holding the log's lock shared
    # (heed_take_position) until it has committed. Each append returns once its row has.
    def _start_committers(self, count: int) -> None:
        self._queue: queue.SimpleQueue[tuple[tuple[Any, ...], Future[int | None]] | None] = queue.SimpleQueue()
        self._committers = [
            threading.Thread(target=self._commit_loop, name=f"heed-eventlog-commit-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._committers:
            thread.start()

    def _write(self, row: tuple[Any, ...]) -> int | None:
        """Queue ``row`` (the COLUMNS) for the next group commit and wait until it has committed;
        its position, or None when a unique key refused it (an idempotency key, a record id)."""
        if self._closed.is_set():
            raise RuntimeError("the event store is closed")
        done: Future[int | None] = Future()
        self._queue.put((row, done))
        return done.result(timeout=self._timeout_s * 3)

    def _commit_loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # this committer's own: it stops after this batch
                    break
                batch.append(item)
            try:
                positions = self._insert([row for row, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
                continue
            self.commits += 1
            for row, done in batch:
                done.set_result(positions.get(row[1]))

    def _insert(self, rows: list[tuple[Any, ...]]) -> dict[str, int]:
        with self._pool.connection() as conn:
            written = conn.execute(INSERT_BATCH, [list(column) for column in zip(*rows, strict=True)]).fetchall()
        return {record_id: int(seq) for record_id, seq in written}

    def append_completion(self, record: CompletionRecord) -> int:
        seq = self._write(
            (
                "completion",
                record.completion_id,
                record.completion_id,
                record.endpoint,
                record.principal,
                record.policy_version,
                float(record.created),  # one type per column array
                record.user,
                record.caller,
                json.dumps([record.prompt, _json_messages(record)]),
                None,
                None,
                None,
                None,
                None,
                json.dumps(record.to_json()),
            )
        )
        if seq is None:
            raise ValueError(f"completion {record.completion_id} is in the event log already")
        return seq

    def append_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        content_hash = record.content_hash()
        key = record.idempotency_key
        if key is not None and (stored := self._stored_for_key(record.principal, key, content_hash)) is not None:
            return stored, False
        seq = self._write(
            (
                "feedback",
                record.feedback_id,
                record.completion_id,
                record.kind,
                record.principal,
                record.policy_version,
                float(record.created),  # one type per column array
                None,
                None,
                None,
                key,
                content_hash,
                record.choice_index,
                record.thumb,
                record.rating,
                json.dumps(record.to_json()),
            )
        )
        if seq is not None:
            return record, True
        # The same key committed by another writer (a replica, a retry) in the meantime: a replay.
        if key is None or (stored := self._stored_for_key(record.principal, key, content_hash)) is None:
            raise ValueError(f"feedback {record.feedback_id} is in the event log already")
        return stored, False

    def _stored_for_key(self, principal: str, key: str, content_hash: str) -> FeedbackRecord | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT content_hash, body FROM events WHERE principal = %s AND idempotency_key = %s", (principal, key)
            ).fetchone()
        if row is None:
            return None
        if row[0] != content_hash:
            raise IdempotencyConflict(key)
        return FeedbackRecord.from_json(json.loads(row[1]))

    def check_writable(self) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO heed_writable VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET checked = excluded.checked"
            )

    # ---- reading -------------------------------------------------------------------------------
    def horizon(self) -> int:
        """The last position below which every write has committed or rolled back."""
        with self._pool.connection() as conn:
            (horizon,) = conn.execute("SELECT heed_horizon()").fetchone() or (0,)
        return int(horizon)

    def get_completion(self, completion_id: str) -> CompletionRecord | None:
        if "\x00" in completion_id:  # no id holds one (PostgreSQL's text cannot)
            return None
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT body FROM events WHERE type = 'completion' AND completion_id = %s", (completion_id,)
            ).fetchone()
        return CompletionRecord.from_json(json.loads(row[0])) if row else None

    def get_completions(self, completion_ids: Iterable[str]) -> dict[str, CompletionRecord]:
        ids = [i for i in dict.fromkeys(completion_ids) if "\x00" not in i]
        found: dict[str, CompletionRecord] = {}
        with self._pool.connection() as conn:
            for start in range(0, len(ids), ID_BATCH):
                rows = conn.execute(
                    "SELECT body FROM events WHERE type = 'completion' AND completion_id = ANY(%s)",
                    (ids[start : start + ID_BATCH],),
                ).fetchall()
                for (body,) in rows:
                    record = CompletionRecord.from_json(json.loads(body))
                    found[record.completion_id] = record
        return found

    def feedback_for(self, completion_id: str) -> list[FeedbackRecord]:
        if "\x00" in completion_id:
            return []
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT body FROM events WHERE type = 'feedback' AND completion_id = %s ORDER BY seq", (completion_id,)
            ).fetchall()
        return [FeedbackRecord.from_json(json.loads(body)) for (body,) in rows]

    def read(self, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        horizon = self.horizon()
        if horizon <= after:
            return []
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT seq, type, body FROM events WHERE seq > %s AND seq <= %s ORDER BY seq LIMIT %s",
                (after, horizon, limit),
            ).fetchall()
        return [LogEntry.from_row(*row) for row in rows]

    def last_seq(self) -> int:
        """The horizon's last committed position (a watermark every reader can read up to)."""
        horizon = self.horizon()
        with self._pool.connection() as conn:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE seq <= %s", (horizon,)).fetchone()
        seq = row[0] if row else 0
        return int(seq)

    def thumb_counts(self) -> dict[str, tuple[int, int]]:
        summaries = self.feedback_summary(0)
        return {v: (s.thumbs_up, s.thumbs_down) for v, s in summaries.items() if s.thumbs_up or s.thumbs_down}

    def feedback_summary(self, after: int = 0) -> dict[str, FeedbackSummary]:
        """Per version, counted from the feedback rows' own columns (no body is parsed). The whole
        log's (``after`` 0) is read from the feedback_totals index alone (an index-only scan): a
        bound on seq, which that index does not hold, would read every feedback row."""
        since = " AND seq > %s" if after > 0 else ""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT policy_version,"
                " COUNT(*) FILTER (WHERE kind = 'thumb' AND thumb = 1),"
                " COUNT(*) FILTER (WHERE kind = 'thumb' AND thumb = -1),"
                " COUNT(*) FILTER (WHERE kind = 'rating'), COALESCE(SUM(rating) FILTER (WHERE kind = 'rating'), 0),"
                " COUNT(*), COUNT(*) FILTER (WHERE kind = 'ranking'), COUNT(*) FILTER (WHERE kind = 'correction')"
                f" FROM events WHERE type = 'feedback'{since} GROUP BY policy_version",
                (after,) if after > 0 else (),
            ).fetchall()
        names = ("thumbs_up", "thumbs_down", "ratings", "rating_sum", "events", "rankings", "corrections")
        summaries = {}
        for version, *counts in rows:
            figures = {k: (float(v) if k == "rating_sum" else int(v)) for k, v in zip(names, counts, strict=True)}
            summaries[version] = FeedbackSummary(**figures)  # type: ignore[arg-type]
        return summaries

    def thumb_votes(self, after: int = 0) -> list[CallerThumbs]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT policy_version, principal, end_user, COUNT(*) FILTER (WHERE thumb = 1),"
                " COUNT(*) FILTER (WHERE thumb = -1) FROM ("
                # the completion's evidence_caller, as in the SQLite store
                "  SELECT f.policy_version, f.principal,"
                "   COALESCE(c.caller, NULLIF(c.end_user, ''), c.principal) AS end_user, f.thumb,"
                "   ROW_NUMBER() OVER (PARTITION BY f.principal, f.completion_id, f.choice_index"
                "    ORDER BY f.seq DESC) AS latest"
                "  FROM events f JOIN events c ON c.completion_id = f.completion_id AND c.type = 'completion'"
                "  WHERE f.type = 'feedback' AND f.kind = 'thumb' AND f.seq > %s"
                ") votes WHERE latest = 1 GROUP BY policy_version, principal, end_user",
                (after,),
            ).fetchall()
        return [CallerThumbs(v, p, u, int(up), int(down)) for v, p, u, up, down in rows]

    def prompts(self, principal: str | None = None, limit: int = 100) -> list[LoggedPrompt]:
        where, args = ("AND principal = %s", (principal, limit)) if principal is not None else ("", (limit,))
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT prompt_key, COUNT(*), MAX(seq) AS latest FROM events WHERE type = 'completion' {where}"
                " GROUP BY prompt_key ORDER BY latest DESC LIMIT %s",
                args,
            ).fetchall()
        logged = []
        for key, times, last in rows:
            prompt, messages = json.loads(key)
            logged.append(
                LoggedPrompt(prompt, tuple(json.loads(messages)) if messages else None, int(times), int(last))
            )
        return logged

    def close(self) -> None:
        """Commit what was queued, then close."""
        if not self._closed.is_set():
            self._closed.set()
            for _ in self._committers:
                self._queue.put(None)  # one for each, behind what was queued
            for thread in self._committers:
                thread.join(timeout=self._timeout_s * 3)
            self._pool.close(timeout=5)


def _pool(url: str, timeout_s: float, size: int, name: str) -> Any:
    """An open pool of autocommit connections whose every wait is limited to ``timeout_s``."""
    from psycopg_pool import ConnectionPool

    ms = int(timeout_s * 1000)
    options = (
        f"-c synchronous_commit=on -c statement_timeout={ms} -c lock_timeout={ms}"
        f" -c idle_in_transaction_session_timeout={ms * 6} {SERVER_KEEPALIVES}"
    )
    pool = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        timeout=timeout_s,
        kwargs={
            "options": options,
            "connect_timeout": max(1, int(timeout_s)),
            "autocommit": True,
            **CLIENT_KEEPALIVES,
        },
        open=False,
        name=name,
    )
    pool.open(wait=True, timeout=timeout_s)
    return pool


class SharedDocument:
    """One JSON document in the shared database that every replica reads and any may write, by
    compare-and-set: a write names the revision it read, and fails if another writer came first."""

    def __init__(self, url: str, name: str, timeout_s: float = STATEMENT_TIMEOUT_MS / 1000) -> None:
        self.name = name
        self._pool = _pool(url, timeout_s, 2, f"heed-document-{name}")
        try:
            migrate(self._pool)
        except BaseException:
            self._pool.close(timeout=1)
            raise

    def revision(self) -> int:
        """The document's revision (0: never written); one indexed read."""
        with self._pool.connection() as conn:
            row = conn.execute("SELECT revision FROM heed_documents WHERE name = %s", (self.name,)).fetchone()
        return int(row[0]) if row else 0

    def read(self) -> tuple[dict[str, Any] | None, int]:
        """The document and its revision (None and 0: never written)."""
        with self._pool.connection() as conn:
            row = conn.execute("SELECT body, revision FROM heed_documents WHERE name = %s", (self.name,)).fetchone()
        return (dict(row[0]), int(row[1])) if row else (None, 0)

    def write(self, body: dict[str, Any], expected: int) -> int | None:
        """Replace the document if its revision is still ``expected`` (0: it does not exist yet);
        the new revision, or None when another writer came first."""
        from psycopg.types.json import Jsonb

        with self._pool.connection() as conn:
            if expected == 0:
                row = conn.execute(
                    "INSERT INTO heed_documents (name, revision, body) VALUES (%s, 1, %s)"
                    " ON CONFLICT (name) DO NOTHING RETURNING revision",
                    (self.name, Jsonb(body)),
                ).fetchone()
            else:
                row = conn.execute(
                    "UPDATE heed_documents SET body = %s, revision = revision + 1, updated = now()"
                    " WHERE name = %s AND revision = %s RETURNING revision",
                    (Jsonb(body), self.name, expected),
                ).fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        self._pool.close(timeout=5)


def _lock_conninfo(url: str) -> str:
    """A session lock's connection: keepalives on both ends notice a silent peer within about
    25 s (the holder learns it lost the lock; the server ends the session and frees the lock for
    the next one), and every statement has a limit."""
    import psycopg

    return psycopg.conninfo.make_conninfo(
        url,
        connect_timeout=5,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} {SERVER_KEEPALIVES}",
        **CLIENT_KEEPALIVES,
    )


class Leadership:
    """Whether this process is the one that decides (a session advisory lock, tried without
    waiting): ``check`` takes the lock when it is free and tells whether it is ours. The lock goes
    with its connection, so a leader that dies or loses the database hands over to the next one
    that checks; a leader whose connection broke learns it at its next check."""

    def __init__(self, url: str, key: tuple[int, int]) -> None:
        self._url, self._key = url, key
        self._conn: Any = None

    def check(self) -> bool:
        import psycopg

        if self._conn is not None:
            try:
                self._conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                self._drop()
        try:
            conn = psycopg.connect(_lock_conninfo(self._url), autocommit=True)
        except psycopg.Error:
            return False
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", self._key).fetchone()
        except psycopg.Error:
            row = None
        if row and row[0]:
            self._conn = conn
            return True
        conn.close()
        return False

    def _drop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None

    def close(self) -> None:
        """Give the lead up (closing the connection releases the lock)."""
        if self._conn is not None:
            self._drop()


class Lease:
    """A session advisory lock held on a connection of its own (``advisory_lease``)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def held(self) -> bool:
        """Whether the lock is still ours: its connection still answers (a lost connection took
        the lock with it, and another holder may have it now)."""
        try:
            self._conn.execute("SELECT 1")
        except Exception:
            return False
        return True


@contextmanager
def advisory_lease(
    url: str, key: tuple[int, int], stop: threading.Event, every_s: float, waiting: Callable[[], None]
) -> Iterator[Lease | None]:
    """Hold the session advisory lock ``key`` on a connection of its own while the block runs.
    While another session holds it, call ``waiting`` once and try again every ``every_s`` until
    ``stop`` is set. Yields the lease (None: stopped while waiting). The lock goes with the
    connection: a holder that dies (or loses the database) lets the next one in, so a holder
    checks ``Lease.held`` before each piece of work (TCP keepalives notice a silent peer)."""
    import psycopg

    with psycopg.connect(_lock_conninfo(url), autocommit=True) as conn:
        said = False
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
            if row and row[0]:
                break
            if not said:
                waiting()
                said = True
            if stop.wait(every_s):
                yield None
                return
        try:
            yield Lease(conn)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)


def create_database(server_url: str, prefix: str) -> str:
    """A new, empty database named ``prefix`` and a random suffix on the server at
    ``server_url`` (for tests and benchmarks); its URL."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    """Drop the database at ``url``, closing its connections (PostgreSQL 13 or newer)."""
    import psycopg

    server_url, name = url.rsplit("/", 1)
    with psycopg.connect(server_url + "/postgres", autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def migrate(pool: Any) -> int:
    """Bring the schema up to date under an advisory lock (replicas starting at once take turns);
    returns the version it started from."""
    with pool.connection() as conn:
        # A migration may rewrite a large table, and replicas starting at once wait for it.
        conn.execute(f"SET statement_timeout = {MIGRATION_TIMEOUT_MS}; SET lock_timeout = {MIGRATION_TIMEOUT_MS}")
        conn.execute("SELECT pg_advisory_lock(%s, %s)", MIGRATION_LOCK)
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS heed_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM heed_schema").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"event log schema version {current} is newer than this heed ({SCHEMA_VERSION}); upgrade heed"
                )
            for version in range(current, SCHEMA_VERSION):
                with conn.transaction():
                    conn.execute(MIGRATIONS[version])
                    conn.execute("DELETE FROM heed_schema")
                    conn.execute("INSERT INTO heed_schema VALUES (%s)", (version + 1,))
            return current
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", MIGRATION_LOCK)
            conn.execute("RESET statement_timeout; RESET lock_timeout")
