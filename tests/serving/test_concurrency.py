"""Many callers at once: every request is answered and logged; an abandoned stream is logged too."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from heed.eventlog import open_store


def test_concurrent_requests_are_all_answered_and_logged(server) -> None:
    def call(i: int) -> str:
        with httpx.Client(base_url=server.http_url, headers=server.headers(), timeout=120) as http:
            response = http.post("/v1/completions", json={"model": "heed", "prompt": f"caller {i}", "max_tokens": 8})
            assert response.status_code == 200
            return response.json()["id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(call, range(32)))

    store = open_store(server.data_dir / "events.db")
    assert all(store.get_completion(i) is not None for i in ids)
    store.close()
    assert len(set(ids)) == 32


@pytest.mark.parametrize("prompts", [1, 3])
def test_a_stream_the_client_abandons_is_still_logged(server, prompts: int) -> None:
    """One prompt's stream, or several prompts' streams as one (each logged as ID-i)."""
    prompt = "a long story" if prompts == 1 else [f"a long story {i}" for i in range(prompts)]
    body = {"model": "heed", "prompt": prompt, "max_tokens": 400, "stream": True}
    with (
        httpx.Client(base_url=server.http_url, headers=server.headers(), timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                completion_id = json.loads(line[6:])["id"]
                break  # hang up after the first chunk

    logged_ids = [completion_id] if prompts == 1 else [f"{completion_id}-{i}" for i in range(prompts)]
    store = open_store(server.data_dir / "events.db")
    deadline = time.monotonic() + 30
    while None in (records := [store.get_completion(i) for i in logged_ids]) and time.monotonic() < deadline:
        time.sleep(0.2)
    store.close()
    for record in records:
        assert record is not None
        assert record.choices[0].finish_reason == "abort"
        assert record.completion_tokens < 400
    assert sum(r.completion_tokens for r in records if r is not None) > 0
    with httpx.Client(base_url=server.http_url, headers=server.headers(), timeout=60) as http:  # nothing is held
        assert (
            http.post("/v1/completions", json={"model": "heed", "prompt": "after", "max_tokens": 2}).status_code == 200
        )
