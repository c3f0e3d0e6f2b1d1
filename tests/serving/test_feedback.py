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
        (
            {"key": "helpfulness", "score": 0.8, "comment": "close", "metadata": {"run": [1, 2]}, "source": "model"},
            {"kind": "score", "key": "helpfulness", "data_type": "NUMERIC", "score": 0.8, "category": None,
             "metadata": {"run": [1, 2]}, "source": "model", "comment": "close"},
        ),
        (  # Langfuse's names
            {"name": "tone", "value": "friendly", "dataType": "CATEGORICAL", "choice_index": 2},
            {"kind": "score", "key": "tone", "data_type": "CATEGORICAL", "score": None, "category": "friendly",
             "choice_index": 2},
        ),
        (  # LangSmith's names; a BOOLEAN may be given as 0 or 1 too
            {"key": "thumbs_up", "value": 0, "data_type": "BOOLEAN", "feedback_source": "user"},
            {"kind": "score", "key": "thumbs_up", "data_type": "BOOLEAN", "score": 0.0, "source": "user"},
        ),
        ({"key": "correct", "score": True}, {"kind": "score", "data_type": "BOOLEAN", "score": 1.0}),
    ],
    ids=[
        "thumb-up", "thumb-down-flagged", "rating", "ranking", "ranking-with-a-tie", "correction",
        "numeric-score", "categorical-score", "boolean-score-as-number", "boolean-score",
    ],
)  # fmt: skip
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


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"score": 0.5}, "key"),
        ({"key": "a b", "score": 0.5}, "key"),
        ({"key": "helpfulness"}, "score"),
        ({"key": "helpfulness", "score": "x" * 300}, "score"),
        ({"key": "helpfulness", "score": 0.5, "data_type": "BOOLEAN"}, "data_type"),
        ({"key": "helpfulness", "score": "good", "data_type": "NUMERIC"}, "data_type"),
        ({"key": "helpfulness", "score": 0.5, "thumb": 1}, "score"),
        ({"thumb": 1, "metadata": {"blob": "x" * 20_000}}, "metadata"),
        ({"thumb": 1, "source": ""}, "source"),
        ({"thumb": 1, "data_type": "NUMERIC"}, "data_type"),
    ],
)
def test_a_malformed_named_score_is_a_400_naming_the_field(http, server, body, param) -> None:
    completion_id = complete(http)

    response = http.post("/v1/feedback", json={"completion_id": completion_id, **body})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    store = open_store(server.data_dir / "events.db")
    assert store.feedback_for(completion_id) == []
    store.close()
