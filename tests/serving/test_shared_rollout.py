"""The rollout state that replicas share. Writes are compare-and-set on both backends (a write over
a revision another writer replaced is refused). On one PostgreSQL database exactly one replica's
controller decides, the others follow the state into their own slots, an admin may act through
any replica, and the lead passes on when its holder goes. Real stores, a real database, real
Slots and Router; only the engines are fakes (what is under test is the rollout, not vLLM)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from heed.eventlog import EventStore, open_store
from heed.eventlog.postgres import CONTROLLER_LOCK, Leadership
from heed.registry import PolicyRegistry
from heed.rollout import RolloutRule, RolloutState, RolloutStore, StaleRollout, open_rollout_store
from serving.controller import RolloutController, initial_state
from serving.engine import EngineSettings
from serving.metrics import ServiceMetrics
from serving.router import Router
from serving.slots import Slots
from tests.fakes import FakeSlot, policy_folder
from tests.loop.test_rollout_rule import thumbs


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_a_write_over_a_revision_that_another_writer_replaced_is_refused(log_url: str, tmp_path: Path) -> None:
    a, b = (open_rollout_store(log_url, tmp_path / "data") for _ in range(2))
    try:
        assert a.load() == (RolloutState(), 0)
        _, seen_by_b = b.load()
        first = initial_state(RolloutState(), "base", 1)
        assert a.save(first, 0) == 1

        with pytest.raises(StaleRollout):
            b.save(RolloutState(stable="other"), seen_by_b)  # b has not seen a's write
        assert b.load() == (first, 1) and b.revision() == 1  # decisions and their evidence round-trip
        second = first.with_decision(first.history[0], canary="v2", canary_share=5.0)
        assert b.save(second, 1) == 2
        assert a.load() == (second, 2)
    finally:
        a.close()
        b.close()


def test_of_writers_racing_from_one_revision_exactly_one_wins(log_url: str, tmp_path: Path) -> None:
    stores = [open_rollout_store(log_url, tmp_path / "data") for _ in range(6)]
    start = threading.Barrier(len(stores))
    won: list[str] = []

    def write(store: RolloutStore, name: str) -> None:
        start.wait()
        try:
            store.save(RolloutState(stable=name), 0)
            won.append(name)
        except StaleRollout:
            pass

    threads = [threading.Thread(target=write, args=(s, f"v{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert len(won) == 1
        assert stores[0].load() == (RolloutState(stable=won[0]), 1)
    finally:
        for s in stores:
            s.close()


@dataclass
class Replica:
    controller: RolloutController
    slots: Slots
    store: EventStore
    leadership: Leadership

    def serving(self) -> dict[str, str]:
        return {name: slot.policy_version for name, slot in self.slots.items()}

    def close(self) -> None:
        self.leadership.close()
        self.controller.rollouts.close()
        self.store.close()


@pytest.fixture
def replicas(postgres: str, tmp_path: Path, tokenizer: Any) -> Iterator[tuple[Replica, Replica, EventStore]]:
    from tests.conftest import drop_database, fresh_database

    url = fresh_database(postgres)
    registry = PolicyRegistry(tmp_path / "shared-registry")  # the storage every node mounts
    registry.import_base(policy_folder(tmp_path / "base", 0.0), "base")
    registry.publish(policy_folder(tmp_path / "v2", 1.0), parent="base")  # v2, as a trainer would
    rule = RolloutRule(steps=(5, 25, 50, 100), min_feedback_per_step=20)
    made: list[Replica] = []
    for name in ("a", "b"):
        data = tmp_path / name

        def new_slot(slot: str, model: Path, version: str, settings: EngineSettings, weights: Path) -> FakeSlot:
            return FakeSlot(slot, model, version, tokenizer, weights, settings)

        stable = new_slot("stable", registry.verify("base"), "base", EngineSettings(max_model_len=256), data / "w")
        stable.start()
        metrics = ServiceMetrics()
        slots = Slots(stable, stable.settings, data, metrics, new_slot=new_slot)
        leadership = Leadership(url, CONTROLLER_LOCK)
        store = open_store(url)
        rollouts = open_rollout_store(url, data)
        controller = RolloutController(
            rollouts, registry, store, slots, Router(slots, "heed"), metrics, rule, leads=leadership.check
        )
        made.append(Replica(controller, slots, store, leadership))
    a, b = made
    a.controller.rollouts.save(initial_state(RolloutState(), "base", 1), 0)
    for r in made:
        r.controller.load()
    writer = open_store(url)  # the users' feedback, as any replica logs it
    yield a, b, writer
    writer.close()
    for r in made:
        r.close()
    drop_database(url)


def test_one_replica_decides_every_replica_follows_and_an_admin_acts_through_either(replicas) -> None:
    a, b, log = replicas

    async def scenario() -> None:
        await a.controller.step()  # a takes the lead, and the published v2 as its canary
        await b.controller.step()
        assert (a.controller.leader, b.controller.leader) == (True, False)
        assert a.controller.state.canary == "v2" and a.serving() == {"stable": "base", "canary": "v2"}
        assert b.controller.state == a.controller.state and b.serving() == {"stable": "base", "canary": "v2"}
        assert a.controller.metrics.rollout_leader._value.get() == 1  # noqa: SLF001 (the gauge's value)
        assert b.controller.metrics.rollout_leader._value.get() == 0  # noqa: SLF001

        # Users like v2: the follower gathers the same evidence but only the leader decides.
        thumbs(log, "base", 20, 20, 0)
        thumbs(log, "v2", 30, 2, 100)
        await b.controller.step()
        assert b.controller.state.canary_share == 5 and b.controller.evidence["p_canary_better"] >= 0.95
        await a.controller.step()
        assert a.controller.state.canary_share == 25
        assert a.controller.state.history[-1].action == "advanced"
        await b.controller.step()
        assert b.controller.state.canary_share == 25 and b.controller.revision == a.controller.revision

        # An admin promotes through the follower; the leader's slots follow.
        await b.controller.act("promote", "ops")
        assert b.serving()["stable"] == "v2"
        await a.controller.step()
        assert a.controller.state.stable == "v2" and a.controller.state.canary is None
        assert a.serving() == {"stable": "v2", "canary": "v2"}  # the idle canary slot keeps stable's weights
        assert [d.action for d in a.controller.state.history][-2:] == ["advanced", "promoted"]

        # The leader goes away (its lock goes with its connection): the other takes the lead.
        a.leadership.close()
        await b.controller.step()
        await a.controller.step()
        assert (a.controller.leader, b.controller.leader) == (False, True)

    asyncio.run(scenario())


def test_a_replica_that_cannot_load_the_canary_sends_it_no_traffic_and_tries_again_after_a_decision(
    replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _ = replicas
    real_verify = b.controller.registry.verify
    failing = {"v2"}

    def verify(version: str) -> Path:
        if version in failing:
            raise OSError(f"{version}: the shared storage is not there (a test)")
        return real_verify(version)

    async def scenario() -> None:
        await b.slots.load("canary", "base", real_verify("base"))  # a warm canary slot on stable
        b.controller.registry = PolicyRegistry(real_verify("base").parent)  # its own object to patch
        monkeypatch.setattr(b.controller.registry, "verify", verify)
        await a.controller.step()  # a leads, and starts v2 at 5%
        await b.controller.step()
        assert b.controller.state.canary == "v2" and b.serving() == {"stable": "base", "canary": "base"}
        assert b.controller.metrics.rollout_in_sync._value.get() == 0  # noqa: SLF001
        routed = {b.controller.router.route("heed", f"user-{i}", "app").name for i in range(400)}
        assert routed == {"stable"}  # not the canary's share to a slot that holds stable's weights

        failing.clear()  # the storage is back; the next decision makes b try again at once
        await a.controller.act("pause", "ops")
        await b.controller.step()
        assert b.serving() == {"stable": "base", "canary": "v2"}
        assert b.controller.metrics.rollout_in_sync._value.get() == 1  # noqa: SLF001

    asyncio.run(scenario())


def test_an_admin_action_when_the_state_cannot_be_reached_is_a_503_not_a_500(replicas) -> None:
    from serving.errors import Unavailable

    a, _, _ = replicas
    a.controller.rollouts.document.close()  # the database out of reach (its pool closed)
    with pytest.raises(Unavailable) as refused:
        asyncio.run(a.controller.act("pause", "ops"))
    assert refused.value.code == "rollout_state_unavailable"


def test_a_service_that_kept_its_state_in_its_data_directory_carries_it_into_the_database(
    postgres: str, tmp_path: Path
) -> None:
    from heed.rollout import save_state
    from tests.conftest import drop_database, fresh_database

    url = fresh_database(postgres)
    kept = initial_state(RolloutState(), "v5", 5)
    save_state(tmp_path / "data", kept)  # heed before the shared state wrote rollout.json
    try:
        store = open_rollout_store(url, tmp_path / "data")
        assert store.load() == (kept, 1)
        store.close()
        # The file is out of the way: a command reading the data directory finds no stale state.
        assert not (tmp_path / "data" / "rollout.json").exists()
        assert (tmp_path / "data" / "rollout.json.moved-to-database").exists()
        save_state(tmp_path / "data", initial_state(RolloutState(), "v1", 1))  # another node's leftover
        open_rollout_store(url, tmp_path / "data").close()
        assert not (tmp_path / "data" / "rollout.json").exists()
        again = open_rollout_store(url, tmp_path / "data")
        assert again.load() == (kept, 1)  # the database's state, not the leftover's
        again.close()
    finally:
        drop_database(url)
