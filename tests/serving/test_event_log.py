"""The event log: durable, ordered, resumable from a watermark; filled through the real API."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from heed.eventlog import (
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    IdempotencyConflict,
    open_store,
    read_after,
)
from heed.eventlog.sqlite import SCHEMA_VERSION


def completion(i: int, principal: str = "alice") -> CompletionRecord:
    return CompletionRecord(
        completion_id=f"cmpl-{i}",
        created=time.time(),
        principal=principal,
        policy_version="v1",
        endpoint="completions",
        prompt=f"prompt {i}",
        messages=None,
        prompt_token_ids=(1, 2),
        params={"n": 1},
        choices=(ChoiceRecord(0, f"answer {i}", (5, 6), "stop"),),
        prompt_tokens=2,
        completion_tokens=2,
        latency_s=0.1,
    )


def thumb(i: int, completion_id: str, key: str | None = None, value: int = 1) -> FeedbackRecord:
    return FeedbackRecord(
        feedback_id=f"fb-{i}",
        completion_id=completion_id,
        created=time.time(),
        principal="alice",
        kind="thumb",
        choice_index=0,
        thumb=value,
        idempotency_key=key,
        policy_version="v1",
    )


def test_a_new_log_is_created_at_the_current_schema_version(tmp_path: Path) -> None:
    open_store(tmp_path / "events.db").close()

    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_log_from_a_newer_heed_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path / "events.db").close()
    conn = sqlite3.connect(tmp_path / "events.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(RuntimeError, match="newer"):
        open_store(tmp_path / "events.db")


def test_records_round_trip_and_come_back_in_commit_order(tmp_path: Path) -> None:
    store = open_store(tmp_path / "events.db")
    store.append_completion(completion(1))
    store.append_feedback(thumb(1, "cmpl-1"))
    store.append_completion(completion(2))

    entries = store.read()

    assert [type(e.record).__name__ for e in entries] == ["CompletionRecord", "FeedbackRecord", "CompletionRecord"]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert entries[0].record.completion_id == "cmpl-1" and entries[1].record.completion_id == "cmpl-1"
    assert store.get_completion("cmpl-2").choices[0].token_ids == (5, 6)


def test_a_reader_resumes_exactly_after_its_watermark(tmp_path: Path) -> None:
    store = open_store(tmp_path / "events.db")
    for i in range(5):
        store.append_completion(completion(i))
    first = list(read_after(store, 0, batch=2))
    watermark = first[2].seq  # the consumer stopped after the third record
    for i in range(5, 7):
        store.append_completion(completion(i))

    resumed = [e.record.completion_id for e in read_after(store, watermark, batch=2)]

    assert resumed == [f"cmpl-{i}" for i in (3, 4, 5, 6)]
    assert list(read_after(store, store.last_seq())) == []


def test_idempotency_keys_replay_the_stored_record_or_conflict(tmp_path: Path) -> None:
    store = open_store(tmp_path / "events.db")
    store.append_completion(completion(1))

    stored, written = store.append_feedback(thumb(1, "cmpl-1", key="k"))
    replay, rewritten = store.append_feedback(thumb(2, "cmpl-1", key="k"))

    assert written and not rewritten
    assert replay.feedback_id == stored.feedback_id == "fb-1"
    with pytest.raises(IdempotencyConflict):
        store.append_feedback(thumb(3, "cmpl-1", key="k", value=-1))
    assert len(store.feedback_for("cmpl-1")) == 1


def test_thumb_counts_are_per_policy_version(tmp_path: Path) -> None:
    store = open_store(tmp_path / "events.db")
    store.append_completion(completion(1))
    store.append_feedback(thumb(1, "cmpl-1"))
    store.append_feedback(thumb(2, "cmpl-1", value=-1))
    store.append_feedback(thumb(3, "cmpl-1"))

    assert store.thumb_counts() == {"v1": (2, 1)}


def test_completions_served_through_the_api_are_in_the_log_with_their_tokens(http, server) -> None:
    store = open_store(server.data_dir / "events.db")
    watermark = store.last_seq()

    plain = http.post(
        "/v1/completions", json={"model": "heed", "prompt": "Log me", "max_tokens": 3, "user": "end-user-9"}
    ).json()
    chat = http.post(
        "/v1/chat/completions",
        json={"model": "heed", "max_tokens": 3, "messages": [{"role": "user", "content": "And me"}]},
    ).json()
    new = [e.record for e in read_after(store, watermark) if isinstance(e.record, CompletionRecord)]
    store.close()

    by_id = {r.completion_id: r for r in new}
    logged_plain, logged_chat = by_id[plain["id"]], by_id[chat["id"]]
    assert logged_plain.prompt == "Log me" and logged_plain.user == "end-user-9"
    assert logged_plain.principal == "alice" and logged_plain.policy_version == "tiny-v1"
    assert len(logged_plain.choices[0].token_ids) == 3 and logged_plain.params["max_tokens"] == 3
    assert logged_plain.choices[0].text == plain["choices"][0]["text"]
    assert logged_chat.messages == ({"role": "user", "content": "And me"},)
    assert logged_chat.prompt_tokens == chat["usage"]["prompt_tokens"] and logged_chat.latency_s > 0
