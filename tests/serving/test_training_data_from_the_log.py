"""The training half's builders, on an event log filled through the real serving API."""

from __future__ import annotations

import httpx

from heed.eventlog import open_store
from training.builders import build_from_event_log


def test_feedback_given_through_the_api_becomes_comparisons_pairs_demonstrations_and_prompts(server) -> None:
    store = open_store(server.data_dir / "events.db")
    watermark = store.last_seq()
    with httpx.Client(base_url=server.http_url, headers=server.headers("bob"), timeout=60) as http:

        def complete(prompt: str, n: int, seed: int = 11) -> dict:
            body = {"model": "heed", "prompt": prompt, "max_tokens": 6, "n": n, "seed": seed}
            return http.post("/v1/completions", json=body).json()

        def feedback(**body: object) -> None:
            assert http.post("/v1/feedback", json=body).status_code == 201

        ranked = complete("Rank these answers", 4)
        feedback(completion_id=ranked["id"], ranking=[3, 1, 0, 2])
        tied = complete("Rank these, ties allowed", 3)
        feedback(completion_id=tied["id"], ranking=[[2, 0], 1])
        liked, disliked = complete("Tell me a joke", 1, seed=1), complete("Tell me a joke", 1, seed=2)
        feedback(completion_id=liked["id"], thumb=1)
        feedback(completion_id=disliked["id"], thumb=-1)
        corrected = complete("Say hello", 1)
        feedback(completion_id=corrected["id"], correction="Hello!")

    data = build_from_event_log(store, watermark)
    store.close()

    texts = [c["text"] for c in ranked["choices"]]
    comparison, with_tie = data.comparisons
    assert comparison.prompt == "Rank these answers"
    assert list(comparison.responses) == [texts[3], texts[1], texts[0], texts[2]] and comparison.ranks is None
    tied_texts = [c["text"] for c in tied["choices"]]
    assert list(with_tie.responses) == [tied_texts[2], tied_texts[0], tied_texts[1]]
    assert with_tie.ranks == (0, 0, 1)  # 2 and 0 tied above 1: no pair between 2 and 0
    (pair,) = data.pairs  # two different answers (two seeds): the one voted up first
    assert pair.prompt == "Tell me a joke"
    assert list(pair.responses) == [liked["choices"][0]["text"], disliked["choices"][0]["text"]]
    (demonstration,) = data.demonstrations
    assert (demonstration.prompt, demonstration.response) == ("Say hello", "Hello!")
    assert sorted(data.prompts) == ["Rank these answers", "Rank these, ties allowed", "Say hello", "Tell me a joke"]
    assert data.watermark > watermark
