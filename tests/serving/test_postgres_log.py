"""What only a shared PostgreSQL log can show (a real server: deploy/postgres-local): writers in
several processes, a reader that must never skip a write committed late with a smaller position,
replicas migrating one fresh database at once, and an idempotency key raced by two replicas."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from heed.eventlog import IdempotencyConflict, LogFollower, open_store, read_after, redacted
from heed.eventlog.postgres import SCHEMA_VERSION
from tests.serving.test_event_log import completion, thumb


@pytest.fixture
def database(postgres: str) -> str:
    from tests.conftest import drop_database, fresh_database

    url = fresh_database(postgres)
    yield url
    drop_database(url)


def open_in_a_process(url: str) -> int:
    store = open_store(url)
    store.close()
    return SCHEMA_VERSION


def write_many(url: str, writer: int, count: int) -> list[int]:
    store = open_store(url)
    try:
        return [store.append_completion(completion(writer * 100_000 + i)) for i in range(count)]
    finally:
        store.close()


def test_replicas_starting_at_once_create_the_schema_once(database: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(4) as pool:
        assert pool.map(open_in_a_process, [database] * 4) == [SCHEMA_VERSION] * 4
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT version FROM heed_schema").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE heed_schema SET version = version + 1")
    with pytest.raises(RuntimeError, match="newer"):
        open_store(database)


def test_a_reader_never_passes_a_write_that_has_not_committed(database: str) -> None:
    """The write that drew position 2 commits after the one that drew 3: a reader that took 3 for
    its watermark would never see 2. The later write does not wait for the earlier one; a reader
    waits for it, and then reads 1, 2, 3."""
    store = open_store(database)
    store.append_completion(completion(1))
    drawn, release = threading.Event(), threading.Event()

    def slow_write() -> None:  # a write as the store makes it, held open before its commit
        with psycopg.connect(database) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO events (seq, type, record_id, completion_id, kind, principal, policy_version, created,"
                " body) VALUES (heed_take_position(), 'completion', 'cmpl-2', 'cmpl-2', 'completions', 'alice',"
                " 'v1', 0, %s)",
                (json.dumps(completion(2).to_json()),),
            )
            drawn.set()
            release.wait(10)

    slow = threading.Thread(target=slow_write)
    slow.start()
    assert drawn.wait(10)
    assert store.append_completion(completion(3)) == 3  # committed while 2 is in flight
    follower = LogFollower(store)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(follower.catch_up)
        time.sleep(1.0)
        assert not reading.done()  # it waits for the write in flight rather than skip it
        release.set()
        assert reading.result(timeout=10) == 3
    slow.join()
    assert [e.seq for e in follower.entries] == [1, 2, 3]
    assert [e.record.completion_id for e in follower.entries] == ["cmpl-1", "cmpl-2", "cmpl-3"]
    store.close()


def test_writers_in_several_processes_and_a_follower_that_never_skips(database: str) -> None:
    open_store(database).close()
    reader = open_store(database)
    follower = LogFollower(reader)
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(4) as pool:
        pending = pool.starmap_async(write_many, [(database, w, 150) for w in range(4)])
        looks = 0
        while not pending.ready():
            follower.catch_up()
            looks += 1
            time.sleep(0.005)
        written = sorted(seq for seqs in pending.get(timeout=120) for seq in seqs)
    follower.catch_up()

    assert looks > 5  # it read while the writers wrote
    assert [e.seq for e in follower.entries] == written == list(range(1, 601))
    assert len({e.record.completion_id for e in follower.entries}) == 600
    assert [e.seq for e in read_after(reader, 0)] == written
    reader.close()


def test_an_idempotency_key_raced_by_two_replicas_is_written_once(database: str) -> None:
    a, b = open_store(database), open_store(database)
    a.append_completion(completion(1))
    outcomes = []
    for attempt in range(10):
        key = f"key-{attempt}"
        with ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda call: call[0].append_feedback(thumb(call[1], "cmpl-1", key=call[2])),
                    [(a, attempt * 2, key), (b, attempt * 2 + 1, key)],
                )
            )
        outcomes.append(sorted(written for _, written in results))
        assert results[0][0].feedback_id == results[1][0].feedback_id
    assert outcomes == [[False, True]] * 10
    assert len(a.feedback_for("cmpl-1")) == 10
    with pytest.raises(IdempotencyConflict):
        b.append_feedback(thumb(99, "cmpl-1", key="key-0", value=-1))
    a.close()
    b.close()


def test_a_second_trainer_on_the_same_log_waits_for_the_first(database: str, tmp_path, caplog) -> None:
    """Trainers on two nodes (two data directories) and one shared log: the second waits for the
    first one's advisory lock, goes on once it is let go, and stops cleanly while it waits."""
    from heed.eventlog.postgres import TRAINER_LOCK, advisory_lease
    from training.config import TrainerConfig
    from training.trainer import run_trainer

    caplog.set_level(logging.INFO)
    open_store(database).close()
    first_stop, waited = threading.Event(), []
    with advisory_lease(database, TRAINER_LOCK, first_stop, 0.05, lambda: waited.append("first")) as first:
        assert first and waited == []
        cfg = TrainerConfig(data_dir=tmp_path / "node-b", event_log=database, poll_s=0.1, once=True)
        stop = threading.Event()
        second = ThreadPoolExecutor(1).submit(run_trainer, cfg, stop)
        deadline = time.monotonic() + 10
        while "waiting for it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "another trainer holds the event log's trainer lock" in caplog.text
        assert not second.done() and "reading the event log" not in caplog.text
        stop.set()
        assert second.result(timeout=10) == 0 and "stopped while waiting" in caplog.text

        third = ThreadPoolExecutor(1).submit(run_trainer, cfg, threading.Event())
        time.sleep(0.5)
        assert not third.done()
    # Let go: the waiting trainer takes the log (and, with too little data, ends its one look).
    third.result(timeout=60)
    assert "reading the event log postgresql://" in caplog.text


def test_concurrent_appends_share_group_commits_and_each_returns_once_committed(database: str) -> None:
    """32 writers on one store: their appends go in fewer commits than appends, each append's
    position is its own and readable once it returns, and a unique key refused inside a batch
    (one idempotency key sent twice at once; a completion id written again) affects only its row."""
    store = open_store(database)
    with ThreadPoolExecutor(32) as pool:
        positions = list(pool.map(lambda i: store.append_completion(completion(i)), range(640)))
    assert len(set(positions)) == 640
    assert [e.seq for e in read_after(store, 0)] == sorted(positions)
    assert store.commits < 640  # type: ignore[attr-defined]

    with ThreadPoolExecutor(8) as pool:
        same_key = list(pool.map(lambda i: store.append_feedback(thumb(i, "cmpl-1", key="once")), range(8)))
    assert sorted(written for _, written in same_key) == [False] * 7 + [True]
    assert {stored.feedback_id for stored, _ in same_key} == {next(s.feedback_id for s, w in same_key if w)}
    with pytest.raises(ValueError, match="already"):
        store.append_completion(completion(3))
    assert store.append_completion(completion(9999)) > max(positions)  # the store writes on
    store.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://heed:s3cret@db:5432/heed", "postgresql://heed:***@db:5432/heed"),
        ("postgresql://heed@db/heed?password=s3cret", "postgresql://heed@db/heed?password=***"),
        (
            "postgres://heed:pw1@db/heed?sslmode=require&PASSWORD=pw2&application_name=x",
            "postgres://heed:***@db/heed?sslmode=require&PASSWORD=***&application_name=x",
        ),
        ("postgresql://heed@db/heed?sslmode=require", "postgresql://heed@db/heed?sslmode=require"),
        ("/data/events.db", "/data/events.db"),
    ],
)
def test_a_log_url_in_a_log_line_shows_no_password(url: str, shown: str) -> None:
    assert redacted(url) == shown
