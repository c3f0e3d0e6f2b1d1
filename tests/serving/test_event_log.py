"""The event log: durable, ordered, resumable from a watermark; filled through the real API.

The contract tests take ``log_url`` and run against both backends (a SQLite file, a PostgreSQL
database); tests/serving/test_postgres_log.py has what only a shared database can show."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from heed.eventlog import (
    ChoiceRecord,
    CompletionRecord,
    FeedbackRecord,
    IdempotencyConflict,
    LogFollower,
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


def _open_and_close(path: str) -> None:
    open_store(path).close()


def test_processes_that_open_a_new_log_at_once_all_open_it(tmp_path: Path) -> None:
    """A server and its trainer (or a benchmark's writers) starting together on a new log: the
    switch to WAL takes the file exclusively, and SQLite refuses it at once, without a busy wait."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(4) as pool:
        for attempt in range(12):
            path = str(tmp_path / f"events-{attempt}.db")
            pool.map(_open_and_close, [path] * 8, chunksize=1)  # raises here if one failed


def test_a_log_from_a_newer_heed_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path / "events.db").close()
    conn = sqlite3.connect(tmp_path / "events.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(RuntimeError, match="newer"):
        open_store(tmp_path / "events.db")


def test_records_round_trip_and_come_back_in_commit_order(log_url: str) -> None:
    store = open_store(log_url)
    store.append_completion(completion(1))
    store.append_feedback(thumb(1, "cmpl-1"))
    store.append_completion(completion(2))

    entries = store.read()

    assert [type(e.record).__name__ for e in entries] == ["CompletionRecord", "FeedbackRecord", "CompletionRecord"]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert entries[0].record.completion_id == "cmpl-1" and entries[1].record.completion_id == "cmpl-1"
    assert store.get_completion("cmpl-2").choices[0].token_ids == (5, 6)


def test_completions_are_fetched_together_by_id_past_one_querys_batch(
    log_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(log_url)
    for i in range(7):
        store.append_completion(completion(i))
        store.append_feedback(thumb(i, f"cmpl-{i}"))  # feedback shares the id: only completions come back
    module = __import__(type(store).__module__, fromlist=["ID_BATCH"])
    monkeypatch.setattr(module, "ID_BATCH", 3)  # 7 or 8 distinct ids: three queries

    asked = ["cmpl-5", "cmpl-0", "nobody", "cmpl-5", "cmpl-3", "cmpl-6", "cmpl-\x00", "cmpl-1", "cmpl-2"]
    found = store.get_completions(iter(asked))

    assert sorted(found) == [f"cmpl-{i}" for i in (0, 1, 2, 3, 5, 6)]  # the unknown and the unstorable left out
    assert all(r.completion_id == k and r.choices[0].text == f"answer {k[5:]}" for k, r in found.items())
    assert store.get_completions([]) == {}


def test_a_reader_resumes_exactly_after_its_watermark(log_url: str) -> None:
    store = open_store(log_url)
    for i in range(5):
        store.append_completion(completion(i))
    first = list(read_after(store, 0, batch=2))
    watermark = first[2].seq  # the consumer stopped after the third record
    for i in range(5, 7):
        store.append_completion(completion(i))

    resumed = [e.record.completion_id for e in read_after(store, watermark, batch=2)]

    assert resumed == [f"cmpl-{i}" for i in (3, 4, 5, 6)]
    assert list(read_after(store, store.last_seq())) == []


def test_idempotency_keys_replay_the_stored_record_or_conflict(log_url: str) -> None:
    store = open_store(log_url)
    store.append_completion(completion(1))

    stored, written = store.append_feedback(thumb(1, "cmpl-1", key="k"))
    replay, rewritten = store.append_feedback(thumb(2, "cmpl-1", key="k"))

    assert written and not rewritten
    assert replay.feedback_id == stored.feedback_id == "fb-1"
    with pytest.raises(IdempotencyConflict):
        store.append_feedback(thumb(3, "cmpl-1", key="k", value=-1))
    assert len(store.feedback_for("cmpl-1")) == 1


def test_thumb_counts_are_per_policy_version(log_url: str) -> None:
    store = open_store(log_url)
    store.append_completion(completion(1))
    store.append_feedback(thumb(1, "cmpl-1"))
    store.append_feedback(thumb(2, "cmpl-1", value=-1))
    store.append_feedback(thumb(3, "cmpl-1"))

    assert store.thumb_counts() == {"v1": (2, 1)}


def _summary(store) -> tuple[dict, list]:
    totals = {
        v: (s.thumbs_up, s.thumbs_down, s.ratings, s.rating_sum, s.events) for v, s in store.feedback_summary(0).items()
    }
    return totals, [(p.prompt, p.times, p.last_seq) for p in store.prompts(limit=1000)]


def _fill_for_the_dashboard(store) -> tuple[dict, list]:
    """Completions of 7 prompts by two principals, thumbs and ratings on two versions; the
    dashboard's figures counted here, as the written records say (what the store must report)."""
    totals: dict[str, list] = {}
    prompts: dict[str, list[int]] = {}
    for i in range(30):
        version = f"v{i % 2 + 1}"
        record = completion(i, principal="alice" if i % 3 else "bob")
        seq = store.append_completion(replace(record, prompt=f"prompt {i % 7}", policy_version=version))
        prompts.setdefault(f"prompt {i % 7}", []).append(seq)
        up = 1 if i % 4 else -1
        store.append_feedback(replace(thumb(i, record.completion_id, value=up), policy_version=version))
        t = totals.setdefault(version, [0, 0, 0, 0.0, 0])
        t[0 if up == 1 else 1] += 1
        t[4] += 1
        if i % 5 == 0:
            said = {"kind": "rating", "thumb": None, "rating": i % 7 + 1, "policy_version": version}
            rating = replace(thumb(100 + i, record.completion_id), **said)
            store.append_feedback(rating)
            t[2], t[3], t[4] = t[2] + 1, t[3] + i % 7 + 1, t[4] + 1
    by_latest = sorted(((p, len(seqs), max(seqs)) for p, seqs in prompts.items()), key=lambda p: -p[2])
    return {v: tuple(t) for v, t in totals.items()}, by_latest


def test_the_dashboard_totals_count_every_write(log_url: str) -> None:
    store = open_store(log_url)
    expected = _fill_for_the_dashboard(store)

    assert _summary(store) == expected
    store.close()


def test_the_dashboard_totals_are_built_for_an_older_log(tmp_path: Path) -> None:
    """SQLite keeps the totals in tables its triggers update; a log written by the heed before
    them (schema 1) gets them built from the log when it is opened."""
    path = tmp_path / "events.db"
    store = open_store(path)
    _fill_for_the_dashboard(store)
    kept = _summary(store)
    store.close()

    with sqlite3.connect(path) as db:
        db.executescript(
            "DROP TRIGGER feedback_totals_kept; DROP TRIGGER prompt_totals_kept;"
            " DROP TABLE feedback_totals; DROP TABLE prompt_totals; PRAGMA user_version = 1;"
        )
    store = open_store(path)
    assert _summary(store) == kept
    store.append_completion(replace(completion(99), prompt="prompt 3"))
    assert _summary(store)[1][0] == ("prompt 3", 1 + sum(1 for i in range(30) if i % 7 == 3), store.last_seq())
    store.close()


def test_readers_on_other_threads_have_their_own_connections(tmp_path: Path) -> None:
    store = open_store(tmp_path / "events.db")
    store.append_completion(completion(1))
    seen: dict[str, object] = {}

    def read(name: str) -> None:
        seen[name] = (store._read(), store.get_completion("cmpl-1"))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=read, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    connections = {id(conn) for conn, _ in seen.values()}  # type: ignore[misc]
    assert len(connections) == 3 and all(record is not None for _, record in seen.values())  # type: ignore[misc]
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        threading.Thread(target=read, args=("late",)).run()


def test_a_follower_reads_only_what_was_committed_since_its_last_look(log_url: str) -> None:
    store = open_store(log_url)
    for i in range(5):
        store.append_completion(completion(i))
    asked_after: list[int] = []
    read = store.read
    store.read = lambda after=0, limit=1000: (asked_after.append(after), read(after, limit))[1]  # type: ignore[method-assign]
    follower = LogFollower(store)

    assert [e.seq for e in follower.until(3)] == [1, 2, 3]
    assert [e.seq for e in follower.until(5)] == [1, 2, 3, 4, 5]  # already read: no second look
    assert asked_after == [0, 5]
    store.append_completion(completion(5))
    store.append_feedback(thumb(1, "cmpl-5"))
    assert follower.catch_up() == 2 and asked_after[-2:] == [5, 7]
    assert [e.seq for e in follower.until(7)] == list(range(1, 8))
    # What it keeps is the log's records without the answers' token ids (the trainer reads the
    # prompt's ids and the answers' text; those ids were most of an entry's memory).
    whole = [e.record for e in read_after(store)]
    assert any(c.token_ids for r in whole if isinstance(r, CompletionRecord) for c in r.choices)
    lean = [
        dataclasses.replace(r, choices=tuple(dataclasses.replace(c, token_ids=()) for c in r.choices))
        if isinstance(r, CompletionRecord)
        else r
        for r in whole
    ]
    assert [e.record for e in follower.entries] == lean
    # What a round's threshold looks at: the entries after a position, up to a watermark.
    looks = len(asked_after)
    assert [e.seq for e in follower.between(3, 6)] == [4, 5, 6]
    assert [e.seq for e in follower.between(0, 2)] == [1, 2]
    assert follower.between(7, 7) == [] and follower.between(6, 4) == []
    assert len(asked_after) == looks  # all of it read already: no look
    # Positions with gaps between them (PostgreSQL's can have): after one in a gap, or on one.
    follower.entries = [
        dataclasses.replace(e, seq=seq) for e, seq in zip(follower.entries[:4], (2, 5, 9, 12), strict=True)
    ]
    follower.position = 12
    assert [e.seq for e in follower.between(3, 9)] == [5, 9] and [e.seq for e in follower.between(5, 11)] == [9]
    store.close()


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
    # The session's server trusts no key to name its users (--user-principals): alice is the caller.
    assert (logged_plain.caller, logged_plain.evidence_caller, logged_chat.caller) == ("alice", "alice", None)
    assert "caller" not in http.get(f"/v1/completions/{plain['id']}").json()
    assert len(logged_plain.choices[0].token_ids) == 3 and logged_plain.params["max_tokens"] == 3
    assert logged_plain.choices[0].text == plain["choices"][0]["text"]
    assert logged_chat.messages == ({"role": "user", "content": "And me"},)
    assert logged_chat.prompt_tokens == chat["usage"]["prompt_tokens"] and logged_chat.latency_s > 0
