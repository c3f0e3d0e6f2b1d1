"""Feedback: every kind is logged on its completion, retries are idempotent, owners only."""

from __future__ import annotations

import uuid

import httpx
import pytest

from heed.eventlog import FeedbackRecord, open_store


def complete(http: httpx.Client, n: int = 1) -> str:
    response = http.post("/v1/completions", json={"model": "heed", "prompt": "Rate me", "max_tokens": 4, "n": n})
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("signal", "stored"),
    [
        ({"thumb": 1}, {"kind": "thumb", "thumb": 1}),
        (
            {"thumb": -1, "flags": ["made_up_facts"], "comment": "wrong"},
            {"kind": "thumb", "thumb": -1, "flags": ("made_up_facts",), "comment": "wrong"},
        ),
        ({"rating": 6}, {"kind": "rating", "rating": 6}),
        ({"ranking": [2, 0, 3, 1]}, {"kind": "ranking", "ranking": (2, 0, 3, 1), "choice_index": None, "ranks": None}),
        ({"ranking": [2, [0, 3], 1]}, {"kind": "ranking", "ranking": (2, 0, 3, 1), "ranks": (0, 1, 1, 2)}),
        (
            {"correction": "A better answer.", "choice_index": 1},
            {"kind": "correction", "correction": "A better answer.", "choice_index": 1},
        ),
    ],
    ids=["thumb-up", "thumb-down-flagged", "rating", "ranking", "ranking-with-a-tie", "correction"],
)
def test_each_feedback_kind_is_logged_on_its_completion(http, server, signal, stored) -> None:
    completion_id = complete(http, n=4)

    response = http.post("/v1/feedback", json={"completion_id": completion_id, **signal})

    assert response.status_code == 201, response.text
    store = open_store(server.data_dir / "events.db")
    (record,) = store.feedback_for(completion_id)
    store.close()
    assert isinstance(record, FeedbackRecord)
    assert record.feedback_id == response.json()["id"]
    assert record.principal == "alice" and record.policy_version == "tiny-v1"
    for key, value in stored.items():
        assert getattr(record, key) == value


def test_a_retry_with_the_same_idempotency_key_is_answered_the_same_and_logged_once(http, server) -> None:
    completion_id = complete(http)
    key = str(uuid.uuid4())
    body = {"completion_id": completion_id, "thumb": 1}

    first = http.post("/v1/feedback", json=body, headers={"Idempotency-Key": key})
    again = http.post("/v1/feedback", json=body, headers={"Idempotency-Key": key})
    by_field = http.post("/v1/feedback", json={**body, "idempotency_key": key})

    assert (first.status_code, again.status_code, by_field.status_code) == (201, 200, 200)
    assert first.json()["id"] == again.json()["id"] == by_field.json()["id"]
    assert len(http.get(f"/v1/completions/{completion_id}").json()["feedback"]) == 1


def test_reusing_an_idempotency_key_with_another_body_is_a_conflict(http) -> None:
    completion_id = complete(http)
    key = str(uuid.uuid4())
    http.post("/v1/feedback", json={"completion_id": completion_id, "thumb": 1}, headers={"Idempotency-Key": key})

    response = http.post(
        "/v1/feedback", json={"completion_id": completion_id, "thumb": -1}, headers={"Idempotency-Key": key}
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_key_reused"


def test_a_logged_completion_is_shown_with_its_feedback_to_its_owner_only(http, server) -> None:
    completion_id = complete(http, n=2)
    http.post("/v1/feedback", json={"completion_id": completion_id, "ranking": [1, 0]})
    http.post("/v1/feedback", json={"completion_id": completion_id, "choice_index": 1, "thumb": 1})

    mine = http.get(f"/v1/completions/{completion_id}")
    theirs = httpx.get(f"{server.http_url}/v1/completions/{completion_id}", headers=server.headers("bob"))
    their_feedback = httpx.post(
        f"{server.http_url}/v1/feedback",
        headers=server.headers("bob"),
        json={"completion_id": completion_id, "thumb": -1},
    )

    assert mine.status_code == 200
    record = mine.json()
    assert record["id"] == completion_id and "principal" not in record
    assert len(record["choices"]) == 2 and all(c["token_ids"] for c in record["choices"])
    assert [f["kind"] for f in record["feedback"]] == ["ranking", "thumb"]
    assert theirs.status_code == 403 and their_feedback.status_code == 403
