"""The service's path to the event log: blocking store calls on one dedicated thread.

One thread keeps SQLite's single-writer rule without lock contention, keeps the event loop
free while a commit waits for fsync, and preserves the order in which writes were issued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from heed.eventlog import CompletionRecord, EventStore, FeedbackRecord
from serving.metrics import ServiceMetrics

T = TypeVar("T")


class EventWriter:
    def __init__(self, store: EventStore, metrics: ServiceMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heed-eventlog")

    async def _run(self, kind: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._writes, call)
        self.metrics.event_log_write_duration.labels(kind).observe(time.perf_counter() - started)
        return result

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
