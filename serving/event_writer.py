"""The service's path to the event log: blocking store calls on dedicated threads.

SQLite gets one thread: it keeps SQLite's single-writer rule without lock contention, and the
order in which writes were issued. PostgreSQL gets several: their commits wait for the disk side
by side (one WAL flush carries many), and the log's own positions keep its readers' order. Either
way the event loop stays free while a commit waits for fsync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from heed.eventlog import CompletionRecord, EventStore, FeedbackRecord, IdempotencyConflict
from serving.errors import Unavailable
from serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_EVERY_S = 2.0  # while the log is unwritable, readiness probes it at most this often
CONFIRM_EVERY_S = 10.0  # while it is writable, readiness probes it when no write succeeded for this long
MAX_PENDING_WRITES = 1024  # writes waiting for the writer thread; past it, a 503 at once


class _FailedMeanwhile(Exception):
    """A queued write not tried: the log failed while it waited for the writer's thread."""


class EventWriter:
    """Writes in issue order on one thread. A write that fails (disk full, database locked) is the
    service's 503, counted, and marks the log unwritable (``failure``) until a later write or a
    probe (``writable``) succeeds: readiness follows it. While the log is unwritable, writes fail
    at once between probes (each would wait out the busy timeout in turn), the writes already
    waiting for the thread too, and at most ``max_pending`` writes wait for the thread: past
    that, a 503 at once."""

    def __init__(
        self, store: EventStore, metrics: ServiceMetrics, max_pending: int = MAX_PENDING_WRITES, threads: int = 1
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_pending = max_pending
        self.failure: str | None = None  # why the last write failed, while the log is unwritable
        self._probed = 0.0
        self._confirmed = 0.0  # when a write or a probe last succeeded
        self._probe: asyncio.Future[None] | None = None  # the probe in flight, which callers share
        self._pending = 0
        self._writes = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="heed-eventlog")

    async def _run(self, kind: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        if self._pending >= self.max_pending:
            self.metrics.event_log_write_failures.labels(kind).inc()
            raise Unavailable(
                f"the event log has {self._pending} writes waiting, its limit; nothing was recorded, retry shortly",
                code="event_log_busy",
            )
        if self.failure is not None and not await self.writable():
            self.metrics.event_log_write_failures.labels(kind).inc()
            raise Unavailable(
                "the event log cannot be written right now, so nothing was recorded; retry shortly",
                code="event_log_unavailable",
            )
        self._pending += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._writes, self._unless_failed, call)
        except IdempotencyConflict:
            raise
        except _FailedMeanwhile:
            self.metrics.event_log_write_failures.labels(kind).inc()
            raise Unavailable(
                "the event log cannot be written right now, so nothing was recorded; retry shortly",
                code="event_log_unavailable",
            ) from None
        except Exception as exc:
            self._failed(exc)
            self.metrics.event_log_write_failures.labels(kind).inc()
            raise Unavailable(
                "the event log cannot be written right now, so nothing was recorded; retry shortly",
                code="event_log_unavailable",
            ) from exc
        finally:
            self._pending -= 1
        self.metrics.event_log_write_duration.labels(kind).observe(time.perf_counter() - started)
        return result

    def _unless_failed(self, call: Callable[[], T]) -> T:
        """``call``, on the writer's thread, unless the log failed while it waited for the thread:
        the writes queued behind a failed one are refused at once, not each after the busy timeout."""
        if self.failure is not None:
            raise _FailedMeanwhile
        try:
            result = call()
        except IdempotencyConflict:
            raise
        except Exception as exc:
            self._failed(exc)  # here, before the thread takes the next write
            raise
        self._recovered()  # here too: the log's state changes in the order the writes ran
        return result

    def _failed(self, exc: Exception) -> None:
        if self.failure is None:
            log.error("the event log cannot be written: %s: %s", type(exc).__name__, exc)
        self.failure = f"{type(exc).__name__}: {exc}"
        self._probed = time.monotonic()  # a failed write is as good as a probe
        self.metrics.event_log_writable.set(0)

    def _recovered(self) -> None:
        if self.failure is not None:
            log.info("the event log takes writes again")
        self.failure = None
        self._confirmed = time.monotonic()
        self.metrics.event_log_writable.set(1)

    async def writable(self) -> bool:
        """Whether the log takes writes, by the last write, else by a probe: a write that records
        nothing. While the log is unwritable, a probe at most every PROBE_EVERY_S, so that readiness
        comes back without traffic; while it is writable but no write succeeded for CONFIRM_EVERY_S
        (an idle server), a probe too, so that readiness also notices a log that broke meanwhile."""
        now = time.monotonic()
        if self.failure is None and now - self._confirmed < CONFIRM_EVERY_S:
            return True
        if self.failure is not None and now - self._probed < PROBE_EVERY_S and self._probe is None:
            return False
        if self._probe is None:
            self._probed = now
            self._probe = asyncio.ensure_future(self._check())
        await asyncio.shield(self._probe)
        return self.failure is None

    async def _check(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._writes, self.store.check_writable)
        except Exception as exc:
            self._failed(exc)
        else:
            self._recovered()
        finally:
            self._probe = None

    async def append_completion(self, record: CompletionRecord) -> int:
        return await self._run("completion", lambda: self.store.append_completion(record))

    async def append_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        return await self._run("feedback", lambda: self.store.append_feedback(record))

    async def read(self, call: Callable[[], T]) -> T:
        """Run a read-only store call off the event loop (reads don't queue behind writes)."""
        return await asyncio.to_thread(call)

    def close(self) -> None:
        self._writes.shutdown(wait=True)  # every issued write commits before the store closes
        self.store.close()
