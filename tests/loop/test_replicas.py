"""Two `heed serve` replicas on one PostgreSQL event log and rollout state, with one registry
folder (real processes, real engines, a real database from deploy/postgres-local): feedback sent
to one replica on a completion the other served is accepted and becomes training data; a canary
promoted through one replica is served by the other, and exactly one of them decides; a replica
killed under load loses nothing it acknowledged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from heed.eventlog import open_store
from heed.registry import PolicyRegistry
from tests.conftest import ARTIFACTS, KEYS, RunningServer, drop_database, fresh_database, start_server
from tests.load import AcknowledgedWrites

pytestmark = pytest.mark.slow  # two servers, each with an engine


@pytest.fixture(scope="module")
def shared_log(postgres: str) -> Iterator[str]:
    url = fresh_database(postgres)
    yield url
    drop_database(url)


ADMIN = {"ops": "sk-admin-ops"}


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-registry")  # the storage every node mounts


@pytest.fixture(scope="module")
def replicas(
    tiny_model: Path, shared_log: str, shared_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[RunningServer]]:
    started: list[RunningServer] = []
    flags = ("--event-log", shared_log, "--registry", str(shared_registry), "--registry-poll-s", "0")
    flags += ("--user-principals", "bob")  # bob's end users are callers of their own
    try:
        for name in ("a", "b"):
            data = tmp_path_factory.mktemp(f"replica-{name}")
            log = ARTIFACTS / f"server-replica-{name}.log"
            started.append(start_server(tiny_model, data, log, KEYS, *flags, admin_keys=ADMIN))
        yield started
    finally:
        for server in started:
            server.stop()


def test_feedback_to_one_replica_on_anothers_completion_is_accepted_and_becomes_training_data(
    replicas: list[RunningServer], shared_log: str, tmp_path: Path
) -> None:
    a, b = replicas
    client_a = OpenAI(base_url=a.http_url + "/v1", api_key=KEYS["bob"], max_retries=0)
    served = client_a.completions.create(model="heed", prompt="Rank us", n=3, max_tokens=4, temperature=1.0, seed=3)
    other = client_a.completions.create(model="heed", prompt="Thumb me", max_tokens=4)
    with httpx.Client(base_url=b.http_url, headers=b.headers("bob"), timeout=60) as http:
        ranked = http.post("/v1/feedback", json={"completion_id": served.id, "ranking": [2, 0, 1]})
        thumbed = http.post("/v1/feedback", json={"completion_id": other.id, "thumb": 1})
        stranger = http.post("/v1/feedback", json={"completion_id": served.id, "thumb": 1}, headers=b.headers("alice"))
        unknown = http.post("/v1/feedback", json={"completion_id": "cmpl-nowhere", "thumb": 1})
    assert ranked.status_code == thumbed.status_code == 201, (ranked.text, thumbed.text)
    assert stranger.status_code == 403 and unknown.status_code == 404  # only its owner may, on any replica

    store = open_store(shared_log)
    on_served = store.feedback_for(served.id)
    store.close()
    assert [(f.kind, f.ranking, f.principal) for f in on_served] == [("ranking", (2, 0, 1), "bob")]

    out = tmp_path / "data"
    exported = subprocess.run(
        [sys.executable, "-m", "heed", "train", "data", "--events", shared_log, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    comparisons = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    texts = [choice.text for choice in served.choices]
    assert [c["responses"] for c in comparisons if "kind" not in c] == [[texts[2], texts[0], texts[1]]]
    judged = [json.loads(line) for line in (out / "judged.jsonl").read_text().splitlines()]
    assert [(j["response"], j["desirable"]) for j in judged] == [(other.choices[0].text, True)]


def _leads(server: RunningServer) -> bool:
    metrics = httpx.get(server.http_url + "/metrics", timeout=30).text
    return "heed_rollout_leader 1.0" in metrics.splitlines()


def test_a_canary_promoted_through_one_replica_is_served_by_the_other(
    replicas: list[RunningServer], shared_registry: Path, tiny_model: Path
) -> None:
    a, b = replicas
    with httpx.Client(headers=a.admin_headers(), timeout=300) as admin:
        base = admin.get(a.http_url + "/admin/rollout").json()["stable"]
        assert admin.get(b.http_url + "/admin/rollout").json()["stable"] == base  # one state
        v2 = PolicyRegistry(shared_registry).publish(tiny_model, parent=base).version  # as a trainer node would

        def b_serves(slot: str) -> tuple[dict, float]:
            """B's status once its ``slot`` serves v2, and the seconds that took."""
            started = time.monotonic()
            while time.monotonic() < started + 180:
                status = admin.get(b.http_url + "/admin/rollout").json()
                held = status["slots"].get(slot) or {}
                if held.get("policy_version") == v2 and held["ready"] and not held["swapping"]:
                    break
                time.sleep(0.2)
            return status, time.monotonic() - started

        canary = admin.post(a.http_url + "/admin/rollout/canary", json={"version": v2})
        assert canary.status_code == 200, canary.text
        status, canary_s = b_serves("canary")  # B's canary slot: an engine start (the tests' lazy slot)
        assert status["canary"] == v2 and status["slots"]["canary"]["policy_version"] == v2, status
        promoted = admin.post(a.http_url + "/admin/rollout/promote")
        assert promoted.status_code == 200 and promoted.json()["stable"] == v2, promoted.text
        status, promoted_s = b_serves("stable")  # B's stable slot: a swap
        assert status["stable"] == v2 and status["history"][-1]["action"] == "promoted", status
        assert status["slots"]["stable"]["policy_version"] == v2, f"B still serves {status['slots']}"
    print(f"replica B served canary {v2} {canary_s:.1f} s after A started it, and stable {promoted_s:.1f} s after")

    answer = httpx.post(
        b.http_url + "/v1/completions",
        json={"model": "heed", "prompt": "Who are you?", "max_tokens": 4},
        headers=b.headers("bob"),
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["model"] == v2
    deadline = time.monotonic() + 30  # each replica looks every 2 s
    while sum(map(_leads, replicas)) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(map(_leads, replicas)) == 1  # exactly one controller decides


def test_a_trainer_on_its_own_node_trains_on_what_both_replicas_logged_and_publishes_to_the_shared_registry(
    replicas: list[RunningServer], shared_log: str, shared_registry: Path, tmp_path: Path
) -> None:
    """Users ask both replicas and thumb each answer through the other one; `heed trainer`, with
    its own data directory, reads the log from PostgreSQL, starts from the stable version the
    shared rollout state names and publishes a version into the shared registry."""
    from tests.training.test_trainer import config, flags

    a, b = replicas
    clients = {s.http_url: OpenAI(base_url=s.http_url + "/v1", api_key=KEYS["bob"], max_retries=0) for s in replicas}
    with httpx.Client(timeout=60) as http:
        stable = http.get(b.http_url + "/admin/rollout", headers=b.admin_headers()).json()["stable"]
        for i in range(60):
            served_by, told = (a, b) if i % 2 == 0 else (b, a)
            question = [{"role": "user", "content": f"Say a word ({i})"}]
            answer = clients[served_by.http_url].chat.completions.create(
                model="heed", messages=question, max_tokens=6, user=f"u{i % 20}"
            )
            thumb = 1 if len(answer.choices[0].message.content or "") % 2 == 0 else -1
            body = {"completion_id": answer.id, "thumb": thumb}
            sent = http.post(told.http_url + "/v1/feedback", json=body, headers=told.headers("bob"))
            assert sent.status_code == 201, sent.text
    store = open_store(shared_log)
    seq = store.last_seq()
    store.close()

    trainer_dir = tmp_path / "trainer-node"
    env = {**os.environ, "HEED_TRAINER_EVENT_LOG": shared_log, "HEED_REGISTRY": str(shared_registry)}
    trained = subprocess.run(
        [sys.executable, "-m", "heed", "trainer", *flags(config(trainer_dir, gate_min_examples=4))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    newest = PolicyRegistry(shared_registry).latest()
    assert newest is not None and (newest.source, newest.parent, newest.watermark) == ("trainer", stable, seq)
    done = json.loads((trainer_dir / "trainer" / "rounds" / "round-0001.json").read_text())
    assert done["decision"] == f"published {newest.version}", done["decision"]
    assert done["data"]["thumbs"] + done["data"]["heldout_thumbs"] >= 60  # both replicas' thumbs


def test_a_replica_killed_under_load_loses_nothing_it_acknowledged(
    replicas: list[RunningServer], shared_log: str
) -> None:
    """Callers write completions and thumbs to both replicas; replica A is SIGKILLed under them.
    Every write either replica acknowledged is in the database; B serves on."""
    a, b = replicas
    acknowledged = AcknowledgedWrites()
    callers = acknowledged.start([(server, f"k{i}", server.headers("bob")) for i in range(6) for server in (a, b)])
    try:
        deadline = time.monotonic() + 90
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(acknowledged) >= 60, "the callers were not acknowledged in time"
        a.stop(signal.SIGKILL)  # in the middle of writes: no shutdown, no flush
        killed_at = len(acknowledged)
        time.sleep(3)
        assert len(acknowledged) > killed_at + 10  # B serves on
        assert all(thread.is_alive() for thread in callers[1::2])  # B's callers
    finally:
        acknowledged.stop.set()
        for thread in callers:
            thread.join(timeout=60)

    assert a.process.returncode == -signal.SIGKILL
    records = acknowledged.check_logged(shared_log)
    assert {r.principal for r in records} == {"bob"}
