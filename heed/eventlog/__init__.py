"""The event log: every completion and every feedback event, append-only, in commit order.

This is the contract between the serving half (which appends) and the training half (which
reads after a watermark). Both import it from here; nothing about the log is defined elsewhere.

    store = open_store("data/events.db")
    for entry in read_after(store, watermark):              # resumes exactly where it stopped
        ...; watermark = entry.seq
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from heed.callers import held_out  # the caller split, re-exported for the log's readers
from heed.eventlog.records import (
    FEEDBACK_KINDS,
    KNOWN_FLAGS,
    SCORE_TYPES,
    CallerThumbs,
    ChoiceRecord,
    CompletionRecord,
    FeedbackKind,
    FeedbackRecord,
    FeedbackSummary,
    LogEntry,
    LoggedPrompt,
    ScoreType,
    check_ranks,
)

__all__ = [
    "FEEDBACK_KINDS",
    "CallerThumbs",
    "KNOWN_FLAGS",
    "SCORE_TYPES",
    "ScoreType",
    "ChoiceRecord",
    "CompletionRecord",
    "EventStore",
    "FeedbackKind",
    "FeedbackRecord",
    "FeedbackSummary",
    "IdempotencyConflict",
    "LogEntry",
    "LogFollower",
    "LoggedPrompt",
    "check_ranks",
    "held_out",
    "is_database_url",
    "log_location",
    "open_store",
    "read_after",
    "redacted",
]


class IdempotencyConflict(Exception):
    """The idempotency key was used before by the same principal for a different body."""


class EventStore(Protocol):
    """What any event-log backend provides (an embedded SQLite file, a shared PostgreSQL database)."""

    writers: int  # how many writes it takes at once to good effect (the service's writer threads)

    def append_completion(self, record: CompletionRecord) -> int:
        """Commit the record durably and return its log position."""
        ...

    def append_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        """Commit the feedback durably; with a known idempotency key return the stored record.

        Returns (the stored record, whether it was newly written). Raises IdempotencyConflict
        when the key was used for a different body.
        """
        ...

    def check_writable(self) -> None:
        """Commit a write that records nothing (raises what a real write would: disk full, locked)."""
        ...

    def get_completion(self, completion_id: str) -> CompletionRecord | None: ...

    def get_completions(self, completion_ids: Iterable[str]) -> dict[str, CompletionRecord]:
        """The completions logged under ``completion_ids`` (the ids not logged are left out), a few
        queries for any number of ids."""
        ...

    def feedback_for(self, completion_id: str) -> list[FeedbackRecord]: ...

    def read(self, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        """Entries with ``seq > after`` in commit order, at most ``limit``."""
        ...

    def last_seq(self) -> int: ...

    def thumb_counts(self) -> dict[str, tuple[int, int]]:
        """Thumbs (up, down) per policy version, over the whole log."""
        ...

    def feedback_summary(self, after: int = 0) -> dict[str, FeedbackSummary]:
        """Thumbs, ratings and event counts per policy version, over the entries after ``after``."""
        ...

    def thumb_votes(self, after: int = 0) -> list[CallerThumbs]:
        """Thumbs per (policy version, caller) over the feedback after ``after``: one vote per
        (principal, completion, choice), the latest (what the rollout controller weighs)."""
        ...

    def prompts(self, principal: str | None = None, limit: int = 100) -> list[LoggedPrompt]:
        """Distinct logged prompts (of ``principal``'s completions, or everyone's), latest first."""
        ...

    def close(self) -> None: ...


def is_database_url(url: str | Path) -> bool:
    """Whether ``url`` names a PostgreSQL database (else a SQLite file)."""
    return str(url).startswith(("postgresql://", "postgres://"))


def log_location(configured: str, data_dir: Path) -> str:
    """Where the event log is: ``configured`` (an --event-log setting), else $HEED_EVENT_LOG, else
    the data directory's SQLite file."""
    from heed.datadir import DataDir

    return configured or os.environ.get("HEED_EVENT_LOG", "") or str(DataDir(data_dir).events)


def redacted(url: str | Path) -> str:
    """``url`` fit for a log line: a database URL's password, in its user part or as a
    ``password=`` parameter (libpq takes either), replaced by ``***``."""
    text = str(url)
    if not is_database_url(text):
        return text
    parts = urlsplit(text)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    query = [
        f"{name}=***" if name.lower() == "password" else param
        for param in parts.query.split("&")
        for name in [param.partition("=")[0]]
    ]
    return urlunsplit(parts._replace(query="&".join(query)))


def open_store(url: str | Path) -> EventStore:
    """Open the event log named by ``url``: a file path, ``sqlite:///PATH`` (as SQLAlchemy), or
    ``postgresql://...`` (a libpq URL: one log that several replicas and a trainer share)."""
    text = str(url)
    if is_database_url(text):
        from heed.eventlog.postgres import PostgresEventStore

        return PostgresEventStore(text)
    text = text.removeprefix("sqlite:///")
    from heed.eventlog.sqlite import SQLiteEventStore

    return SQLiteEventStore(Path(text))


def read_after(store: EventStore, watermark: int = 0, batch: int = 1000) -> Iterator[LogEntry]:
    """Every entry after ``watermark`` in commit order, fetched in batches."""
    while True:
        entries = store.read(after=watermark, limit=batch)
        if not entries:
            return
        yield from entries
        watermark = entries[-1].seq


def _lean(entry: LogEntry) -> LogEntry:
    record = entry.record
    if not isinstance(record, CompletionRecord) or not any(c.token_ids for c in record.choices):
        return entry
    choices = tuple(dataclasses.replace(c, token_ids=()) for c in record.choices)
    return dataclasses.replace(entry, record=dataclasses.replace(record, choices=choices))


class LogFollower:
    """The log read once and then followed: each call reads only what was committed since the
    last one (a long-running reader, the trainer, does not read the whole log again on every look).
    Keeps the entries it read, in commit order, lean: without the answers' token ids, which the
    trainer never reads (it trains on the prompt's ids and the answers' text) and which were most
    of an entry's memory (``EventStore.get_completion`` has the whole record)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.entries: list[LogEntry] = []
        self.position = 0  # the seq of the last entry read

    def catch_up(self) -> int:
        """Read what is new; the number of entries read."""
        before = len(self.entries)
        for entry in read_after(self.store, self.position):
            self.entries.append(_lean(entry))
            self.position = entry.seq
        return len(self.entries) - before

    def until(self, watermark: int) -> list[LogEntry]:
        """Every entry up to ``watermark``, reading on first if the follower is behind it."""
        return self.between(0, watermark)

    def between(self, after: int, watermark: int) -> list[LogEntry]:
        """The entries after ``after`` up to ``watermark``, reading on first if the follower is behind it."""
        if watermark > self.position:
            self.catch_up()
        start = bisect.bisect_right(self.entries, after, key=lambda e: e.seq)
        return self.entries[start : bisect.bisect_right(self.entries, watermark, key=lambda e: e.seq)]
