"""Event-log benchmark: durable ingest and the trainer's read, SQLite and PostgreSQL side by side.

Ingest: W concurrent writers (spread over 2 processes, threads in each, one store per process as
a serving replica has) append completions and feedback for --seconds; every append has committed
durably when it returns. Events/s for W = 1, 8 and 64, with pgbench's own rate for a one-row
INSERT of the same size at the same number of clients on the same PostgreSQL server beside it
(the anchor: goal, heed's PostgreSQL ingest at 64 writers at least half of it).

Read: --read-events events (1,000,000 by default: completions of 1,000 end users, a thumb on
each) bulk-loaded into a fresh PostgreSQL log, then read from position 0 by the trainer's reader
(LogFollower.catch_up): goal, under a minute. Then what the trainer does with them: the memory
the follower holds them in, a poll's look at the feedback since the last round (the last 2,000
events; then 1,000 late thumbs on the log's first answers, which the look fetches by id) and a
round's whole data (training.round.build_round_data), each timed.

    deploy/postgres-local start
    .venv/bin/python bench/ingest.py                       # the throwaway cluster's URL by default
    .venv/bin/python bench/ingest.py --postgres postgresql://heed@127.0.0.1:55432/heed --writers 1,8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, LogFollower, is_database_url, open_store
from heed.eventlog.postgres import PostgresEventStore, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 2  # the machine's cores; writers are threads spread over them


def completion(n: int, writer: str) -> CompletionRecord:
    """A completion the size of a short chat answer (~1 KB of JSON)."""
    return CompletionRecord(
        completion_id=f"cmpl-{writer}-{n}",
        created=time.time(),
        principal="bench",
        policy_version="v1",
        endpoint="chat.completions",
        prompt=None,
        messages=({"role": "user", "content": "Explain why the sky is blue in two sentences."},),
        prompt_token_ids=tuple(range(20)),
        params={"max_tokens": 64, "temperature": 1.0},
        choices=(ChoiceRecord(0, "Rayleigh scattering " * 8, tuple(range(64)), "length"),),
        prompt_tokens=20,
        completion_tokens=64,
        latency_s=0.5,
        user=f"user-{n % 100}",
    )


def thumb(n: int, writer: str) -> FeedbackRecord:
    return FeedbackRecord(
        feedback_id=f"fb-{writer}-{n}",
        completion_id=f"cmpl-{writer}-{n}",
        created=time.time(),
        principal="bench",
        kind="thumb",
        choice_index=0,
        thumb=1 if n % 3 else -1,
        policy_version="v1",
    )


def _writer_process(url: str, threads: int, seconds: float, start_at: float, results: multiprocessing.Queue) -> None:
    # A pooled store gets a connection per writer thread, as many as write at once.
    store = PostgresEventStore(url, pool_size=threads) if is_database_url(url) else open_store(url)
    counts = [0] * threads

    def write(i: int) -> None:
        name = f"{os.getpid()}-{i}-{uuid.uuid4().hex[:6]}"
        n = 0
        time.sleep(max(0.0, start_at - time.time()))
        end = start_at + seconds
        while time.time() < end:
            store.append_completion(completion(n, name))
            store.append_feedback(thumb(n, name))
            n += 1
            counts[i] += 2

    pool = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    store.close()
    results.put(sum(counts))


def ingest(url: str, writers: int, seconds: float) -> float:
    """Events/s durably appended by ``writers`` concurrent writers."""
    spawn = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = spawn.Queue()
    processes = min(PROCESSES, writers)
    shares = [writers // processes + (1 if i < writers % processes else 0) for i in range(processes)]
    start_at = time.time() + 3.0  # every process has opened its store by then
    procs = [spawn.Process(target=_writer_process, args=(url, n, seconds, start_at, results)) for n in shares]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=seconds + 120) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def pgbench(server_url: str, clients: int, seconds: float) -> float:
    """pgbench's transactions/s for a one-row INSERT of a record-sized body, ``clients`` clients."""
    url = create_database(server_url, "heed_bench")
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_events (seq BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
        body = json.dumps(completion(0, "pgbench").to_json()).replace("'", "")
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write(f"INSERT INTO bench_events (body) VALUES ('{body}');\n")
        os.chmod(script.name, 0o644)
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        command = [str(bindir / "pgbench"), "-n", "-c", str(clients), "-j", str(min(clients, PROCESSES))]
        command += ["-T", str(int(seconds)), "-f", script.name, url]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
        os.unlink(script.name)
        match = re.search(r"tps = ([0-9.]+)", out)
        assert match, out
        return float(match.group(1))
    finally:
        drop_database(url)


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_million(server_url: str, events: int) -> dict[str, float]:
    """The trainer's reader on ``events`` bulk-loaded events from position 0: seconds to read
    them, the memory its follower holds them in, and the seconds of a poll's and of a round's data."""
    import psycopg

    # Run as a script, this file's folder comes first on sys.path, and bench/training.py would
    # shadow the `training` package: drop the folder. (It imports torch: before the memory baseline.)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    from training.round import build_round_data

    url = create_database(server_url, "heed_bench")
    try:
        open_store(url).close()  # the schema
        c_body = json.dumps(completion(0, "read").to_json())
        f_body = json.dumps(thumb(0, "read").to_json())
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            # Each record its own: completion n's id, prompt and end user (of 1,000); the thumb on it.
            conn.execute(
                "INSERT INTO events (seq, type, record_id, completion_id, kind, principal, policy_version, created,"
                " end_user, thumb, choice_index, body)"
                " SELECT n, CASE WHEN n %% 2 = 1 THEN 'completion' ELSE 'feedback' END, 'r' || n, 'c' || (n + 1) / 2,"
                " CASE WHEN n %% 2 = 1 THEN 'chat.completions' ELSE 'thumb' END, 'bench', 'v1', 0,"
                " 'user-' || ((n + 1) / 2) %% 1000, CASE WHEN n %% 2 = 0 THEN 1 END, CASE WHEN n %% 2 = 0 THEN 0 END,"
                " CASE WHEN n %% 2 = 1 THEN jsonb_set(jsonb_set(jsonb_set(%s::jsonb,"
                "   '{completion_id}', to_jsonb('c' || (n + 1) / 2)),"
                "   '{user}', to_jsonb('user-' || ((n + 1) / 2) %% 1000)),"
                "   '{messages,0,content}', to_jsonb('Question ' || (n + 1) / 2 || ': why is the sky blue?'))::text"
                " ELSE jsonb_set(jsonb_set(%s::jsonb, '{completion_id}', to_jsonb('c' || (n + 1) / 2)),"
                "   '{feedback_id}', to_jsonb('r' || n))::text END"
                " FROM generate_series(1, %s) AS n",
                (c_body, f_body, events),
            )
            conn.execute("SELECT setval('heed_event_seq', %s)", (events,))
            conn.execute("VACUUM ANALYZE events")
        print(f"  loaded {events:,} events in {time.perf_counter() - started:.0f} s", flush=True)
        store = open_store(url)
        follower = LogFollower(store)
        before = _rss_mib()
        started = time.perf_counter()
        read = follower.catch_up()
        seconds = time.perf_counter() - started
        held = _rss_mib() - before
        last = follower.position
        started = time.perf_counter()
        fresh = build_round_data(store, last, 0.1, follower=follower, since=last - 2000)
        poll = time.perf_counter() - started
        started = time.perf_counter()
        whole = build_round_data(store, last, 0.1, follower=follower)
        round_data = time.perf_counter() - started
        # Late feedback: 1,000 thumbs on answers from the log's start, whose records the look fetches by id.
        for n in range(1, 1001):
            store.append_feedback(dataclasses.replace(thumb(n, "late"), completion_id=f"c{n}"))
        started = time.perf_counter()
        late = build_round_data(store, store.last_seq(), 0.1, follower=follower, since=last)
        poll_late = time.perf_counter() - started
        store.close()
        assert len(fresh.train.judged) + len(fresh.heldout.judged) == 1000, "the poll's look saw other thumbs"
        assert len(late.train.judged) + len(late.heldout.judged) == 1000, "the late thumbs' look saw other thumbs"
        thumbs = len(whole.train.judged) + len(whole.heldout.judged)
        return {
            "events": read, "seconds": seconds, "events_per_s": read / seconds, "follower_mib": held,
            "poll_seconds": poll, "poll_late_seconds": poll_late, "round_data_seconds": round_data,
            "round_thumbs": thumbs,
        }  # fmt: skip
    finally:
        drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default="", help="a PostgreSQL server URL; empty: deploy/postgres-local's")
    parser.add_argument(
        "--writers", default="1,8,64", help="writers to measure, comma-separated (empty: the read alone)"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each ingest run writes")
    parser.add_argument("--read-events", type=int, default=1_000_000, help="events for the read benchmark (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    server = (
        args.postgres
        or subprocess.run(
            [str(ROOT / "deploy" / "postgres-local"), "start"], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    cpu = Path("/proc/cpuinfo").read_text()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" avx512f={'avx512f' in cpu}, avx512_bf16={'avx512_bf16' in cpu}"
    )

    rows = []
    for writers in [int(w) for w in args.writers.split(",") if w.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite_rate = ingest(str(Path(tmp) / "events.db"), writers, args.seconds)
        url = create_database(server, "heed_bench")
        try:
            pg_rate = ingest(url, writers, args.seconds)
        finally:
            drop_database(url)
        anchor = pgbench(server, writers, args.seconds)
        rows.append({"writers": writers, "sqlite": sqlite_rate, "postgresql": pg_rate, "pgbench": anchor})
        print(
            f"  {writers:3d} writers: SQLite {sqlite_rate:8.0f} events/s | PostgreSQL {pg_rate:8.0f} events/s"
            f" | pgbench INSERT {anchor:8.0f}/s | PostgreSQL / pgbench = {pg_rate / anchor:.2f}",
            flush=True,
        )
    read = None
    if args.read_events:
        read = read_million(server, args.read_events)
        print(
            f"  the trainer's reader: {read['events']:,} events in {read['seconds']:.1f} s"
            f" ({read['events_per_s']:,.0f} events/s), held in {read['follower_mib']:,.0f} MiB;"
            f" a poll's look at the last 2,000: {read['poll_seconds']:.2f} s, at 1,000 late thumbs"
            f" (their answers fetched): {read['poll_late_seconds']:.2f} s; a round's data"
            f" ({read['round_thumbs']:,} thumbs): {read['round_data_seconds']:.1f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ingest": rows, "read": read, "seconds": args.seconds}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
