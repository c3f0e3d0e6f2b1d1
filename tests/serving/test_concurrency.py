"""Many callers at once: every request is answered and logged; an abandoned stream is logged too."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

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


def test_a_stream_the_client_abandons_is_still_logged(server) -> None:
    body = {"model": "heed", "prompt": "a long story", "max_tokens": 400, "stream": True}
    with (
        httpx.Client(base_url=server.http_url, headers=server.headers(), timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                completion_id = json.loads(line[6:])["id"]
                break  # hang up after the first chunk

    store = open_store(server.data_dir / "events.db")
    deadline = time.monotonic() + 30
    while (record := store.get_completion(completion_id)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    store.close()
    assert record is not None
    assert record.choices[0].finish_reason == "abort"
    assert 0 < record.completion_tokens < 400
