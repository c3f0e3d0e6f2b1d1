"""Callers that write without pause (completions, each thumbed) and keep what was acknowledged:
for the tests that kill a server under load and then look for every acknowledged write."""

from __future__ import annotations

import threading

import httpx

from heed.eventlog import CompletionRecord, FeedbackRecord, open_store
from heed.launcher import ServerProcess


class AcknowledgedWrites:
    """The ids of every completion (200) and feedback (201) a caller saw acknowledged, in order."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def _add(self, ident: str) -> None:
        with self._lock:
            self.ids.append(ident)

    def caller(self, server: ServerProcess, name: str, headers: dict[str, str] | None = None) -> None:
        """Write until ``stop``; return quietly when the server goes away."""
        with httpx.Client(base_url=server.http_url, headers=headers or {}, timeout=30) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    body = {"model": "heed", "prompt": f"{name}-{n}", "max_tokens": 2}
                    done = http.post("/v1/completions", json=body)
                    if done.status_code != 200:
                        continue
                    self._add(done.json()["id"])
                    thumb = http.post("/v1/feedback", json={"completion_id": done.json()["id"], "thumb": 1})
                    if thumb.status_code == 201:
                        self._add(thumb.json()["id"])
                except httpx.HTTPError:
                    return  # the server is gone

    def start(self, callers: list[tuple[ServerProcess, str, dict[str, str] | None]]) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.caller, args=args) for args in callers]
        for thread in threads:
            thread.start()
        return threads

    def check_logged(self, event_log: str) -> list[CompletionRecord | FeedbackRecord]:
        """Assert that every acknowledged write is in the log at ``event_log``, and nothing
        half-done (feedback without its completion); the log's records, in order."""
        store = open_store(event_log)
        records = [e.record for e in store.read(limit=1_000_000)]
        store.close()
        completions = {r.completion_id for r in records if isinstance(r, CompletionRecord)}
        logged = completions | {r.feedback_id for r in records if isinstance(r, FeedbackRecord)}
        assert set(self.ids) <= logged, sorted(set(self.ids) - logged)[:5]
        assert all(r.completion_id in completions for r in records if isinstance(r, FeedbackRecord))
        return records
