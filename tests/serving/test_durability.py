"""Nothing acknowledged is lost: SIGKILL right after acknowledged writes, or in the middle of many,
then reopen the log."""

from __future__ import annotations

import signal
import sqlite3
import time

import httpx
import pytest

from heed.eventlog import CompletionRecord, FeedbackRecord
from tests.conftest import ARTIFACTS, start_server
from tests.load import AcknowledgedWrites

pytestmark = pytest.mark.slow  # starts its own `heed serve`


def test_sigkill_in_the_middle_of_concurrent_writes_loses_nothing_acknowledged(tiny_model, tmp_path) -> None:
    """One caller writes 12 completions and thumbs, in order; then 16 callers write without pause
    and the server is killed under them. Every write a caller saw acknowledged is in the log (the
    first 12 in their order), the log is intact, and nothing half-done (feedback without its
    completion) is in it."""
    server = start_server(tiny_model, tmp_path / "data", ARTIFACTS / "server-sigkill.log", keys=None)
    first_completions, first_feedback = [], []
    # Open mode (no keys) must say so loudly at start-up.
    assert "NO API KEYS CONFIGURED" in server.log_text()
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        for i in range(12):
            response = http.post("/v1/completions", json={"model": "heed", "prompt": f"p{i}", "max_tokens": 2})
            assert response.status_code == 200
            first_completions.append(response.json()["id"])
            feedback = http.post(
                "/v1/feedback", json={"completion_id": response.json()["id"], "thumb": 1 if i % 2 else -1}
            )
            assert feedback.status_code == 201
            first_feedback.append(feedback.json()["id"])

    acknowledged = AcknowledgedWrites()  # completion and feedback ids, as their 200/201 arrived
    callers = acknowledged.start([(server, f"c{i}", None) for i in range(16)])
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(acknowledged) >= 60, "the callers were not acknowledged in time"
    finally:
        server.stop(signal.SIGKILL)  # in the middle of writes: no shutdown, no flush
        acknowledged.stop.set()
        for thread in callers:
            thread.join(timeout=60)

    assert server.process.returncode == -signal.SIGKILL
    with sqlite3.connect(server.data.events) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    records = acknowledged.check_logged(str(server.data.events))
    assert [r.completion_id for r in records if isinstance(r, CompletionRecord)][:12] == first_completions
    assert [r.feedback_id for r in records if isinstance(r, FeedbackRecord)][:12] == first_feedback
    assert all(r.principal == "anonymous" for r in records)
