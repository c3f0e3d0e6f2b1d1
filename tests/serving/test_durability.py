"""Nothing acknowledged is lost: SIGKILL right after acknowledged writes, then reopen the log."""

from __future__ import annotations

import signal

import httpx
import pytest

from heed.eventlog import CompletionRecord, FeedbackRecord, open_store
from tests.conftest import ARTIFACTS, start_server

pytestmark = pytest.mark.slow  # starts its own `heed serve`


def test_acknowledged_completions_and_feedback_survive_sigkill(tiny_model, tmp_path) -> None:
    server = start_server(tiny_model, tmp_path / "data", ARTIFACTS / "server-sigkill.log", keys=None)
    acknowledged_completions, acknowledged_feedback = [], []
    try:
        # Open mode (no keys) must say so loudly at start-up.
        assert "NO API KEYS CONFIGURED" in server.log_text()
        with httpx.Client(base_url=server.http_url, timeout=60) as http:
            for i in range(12):
                response = http.post("/v1/completions", json={"model": "heed", "prompt": f"p{i}", "max_tokens": 2})
                assert response.status_code == 200
                acknowledged_completions.append(response.json()["id"])
                feedback = http.post(
                    "/v1/feedback", json={"completion_id": response.json()["id"], "thumb": 1 if i % 2 else -1}
                )
                assert feedback.status_code == 201
                acknowledged_feedback.append(feedback.json()["id"])
    finally:
        server.stop(signal.SIGKILL)  # no graceful shutdown, no flush

    assert server.process.returncode == -signal.SIGKILL
    store = open_store(server.data.events)
    records = [e.record for e in store.read(limit=10_000)]
    store.close()
    assert [r.completion_id for r in records if isinstance(r, CompletionRecord)] == acknowledged_completions
    assert [r.feedback_id for r in records if isinstance(r, FeedbackRecord)] == acknowledged_feedback
    assert all(r.principal == "anonymous" for r in records)
