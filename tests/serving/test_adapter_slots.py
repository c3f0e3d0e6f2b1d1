"""Adapter mode's service core without an engine: one engine (a fake, tests/fakes.py) serves every
version as a LoRA adapter of its base; the slots are views of it. The router, the views, the
rollout controller, a real registry and a real SQLite event log run for real. Fast."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from heed.datadir import DataDir
from heed.eventlog import EventStore, open_store
from heed.registry import PolicyRegistry
from heed.rollout import RolloutRule, RolloutState, load_state, open_rollout_store
from serving.adapters import AdapterEngine, AdapterSlot
from serving.completions import CompletionService
from serving.controller import RolloutController
from serving.engine import EngineSettings
from serving.errors import InvalidRequest, NotFound
from serving.event_writer import EventWriter
from serving.grpc.server import _rollout_status
from serving.metrics import ServiceMetrics
from serving.requests import GenerationRequest
from serving.router import Router
from serving.slots import Slots
from tests.fakes import FakeEngine, FakeSlot, policy_folder
from tests.loop.test_registry import lora_adapter


@dataclass
class Core:
    store: EventStore
    registry: PolicyRegistry
    adapters: AdapterEngine
    slots: Slots
    router: Router
    controller: RolloutController
    completions: CompletionService
    data_dir: Path

    @property
    def engine(self) -> FakeEngine:
        assert isinstance(self.adapters.slot.engine, FakeEngine)
        return self.adapters.slot.engine

    async def answer(self, version: str | None = None) -> tuple[str, list[int]]:
        """A completion for the alias (``version`` None) or pinned to a version: who answered, and how."""
        request = GenerationRequest(
            endpoint="chat.completions", model="heed", messages=[{"role": "user", "content": "Hi"}]
        )
        prepared = await self.completions.prepare(request, "alice", pinned_version=version)
        result = await self.completions.complete(prepared)
        return result.policy_version, list(result.choices[0].token_ids)


@pytest.fixture
def core(tmp_path: Path, tokenizer_dir: Path, tiny_model: Path) -> Iterator[Core]:
    from transformers import AutoTokenizer

    data = DataDir(tmp_path / "data")
    registry = PolicyRegistry(data.registry)
    registry.import_base(tiny_model, "base")
    for name in ("v2", "v3"):  # the trainer's adapters on the base
        registry.publish(lora_adapter(tmp_path / name), mode="adapter", base="base", parent="base")
    store = open_store(data.events)
    metrics = ServiceMetrics()
    writer = EventWriter(store, metrics)
    settings = EngineSettings(max_model_len=256, lora=True)
    shared = FakeSlot("engine", registry.verify("base"), "base", AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    adapters = AdapterEngine(shared, data.engine_weights("adapters"))
    stable = adapters.view("stable", "base")
    stable.start()
    slots = Slots(stable, settings, data.root, metrics, adapters=adapters)
    asyncio.run(slots.load("stable", "base", registry.verify("base")))
    router = Router(slots, "heed")
    rule = RolloutRule(steps=(5, 25, 50, 100), min_feedback_per_step=10, min_requests=20)
    rollouts = open_rollout_store(str(data.events), data.root)
    controller = RolloutController(rollouts, registry, store, slots, router, metrics, rule)
    controller.state = RolloutState(stable="base", considered_sequence=3, mode="adapter")
    router.follow(controller.state)
    completions = CompletionService(router, writer, metrics, max_n=4)
    yield Core(store, registry, adapters, slots, router, controller, completions, data.root)
    writer.close()
    store.close()


def expected(core: Core, version: str) -> list[int]:
    return core.engine.answer(0, 16, version)[:3]


def promote_v2_then_v3(core: Core, tmp_path: Path) -> None:
    """v3 stable, v2 the previous stable; v4 published, not yet served."""
    core.registry.publish(lora_adapter(tmp_path / "v4"), mode="adapter", base="base", parent="v3")  # v4
    for version in ("v2", "v3"):
        asyncio.run(core.controller.act("canary", "ops", version))
        asyncio.run(core.controller.act("promote", "ops"))


def test_the_base_is_served_as_an_adapter_of_zeros_and_a_canary_goes_live_without_any_swap(core: Core) -> None:
    identity = Path(core.adapters.resident["base"].lora_path)
    assert (identity / "adapter_config.json").is_file() and identity.parent == DataDir(core.data_dir).engine_weights(
        "adapters"
    )
    assert asyncio.run(core.answer()) == ("base", expected(core, "base"))

    asyncio.run(core.controller.act("canary", "ops", "v2"))

    canary = core.slots.canary
    assert isinstance(canary, AdapterSlot) and canary.engine is core.slots.stable.engine  # one engine
    assert core.engine.calls == ["add_lora:base", "add_lora:v2"]  # no pause, no reload, no prefix-cache reset
    assert not any(s.swapping for _, s in core.slots.items())
    started = core.controller.state.history[-1]
    assert started.action == "canary_started" and started.evidence["load_seconds"] < 1.0
    assert asyncio.run(core.answer("v2")) == ("v2", expected(core, "v2"))  # each version answers as itself
    assert asyncio.run(core.answer("base")) == ("base", expected(core, "base"))
    assert expected(core, "v2") != expected(core, "base")  # the two can be told apart

    status = asyncio.run(core.controller.act("promote", "ops"))

    assert (status.state.stable, status.state.canary) == ("v2", None)
    assert (_rollout_status(status).mode, status.to_json()["mode"]) == ("adapter", "adapter")  # gRPC and HTTP
    assert asyncio.run(core.answer()) == ("v2", expected(core, "v2"))
    assert core.adapters.previous == "base" and core.engine.calls[-1] == "add_lora:v2"  # a re-point only


def test_a_request_keeps_its_version_across_a_rollback_and_the_adapter_leaves_only_after_it(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))

    async def scenario() -> tuple[str, list[int]]:
        request = GenerationRequest(
            endpoint="chat.completions", model="heed", messages=[{"role": "user", "content": "Hi"}]
        )
        held = await core.completions.prepare(request, "alice", pinned_version="v2")  # leased, not yet run
        await core.controller.act("rollback", "ops")
        assert "remove_lora:v2" not in core.engine.calls  # a request holds it
        assert core.slots.canary is not None and core.slots.canary.policy_version == "base"
        result = await core.completions.complete(held)
        await asyncio.sleep(0)  # the eviction the release scheduled
        await asyncio.sleep(0)
        return result.policy_version, list(result.choices[0].token_ids)

    v2_id = core.adapters.resident["v2"].lora_int_id
    assert asyncio.run(scenario()) == ("v2", expected(core, "v2"))
    assert core.engine.calls[-1] == "remove_lora:v2" and "v2" not in core.adapters.resident
    assert set(core.engine.loras) == {core.adapters.resident["base"].lora_int_id}
    assert load_state(core.data_dir).history[-1].action == "rolled_back"

    asyncio.run(core.controller.act("canary", "ops", "v2"))  # again: vLLM knows a name by one id only
    assert core.adapters.resident["v2"].lora_int_id == v2_id


def test_evictions_keep_stable_canary_previous_and_the_base(core: Core, tmp_path: Path) -> None:
    promote_v2_then_v3(core, tmp_path)
    assert set(core.adapters.resident) == {"base", "v2", "v3"}  # v3 stable, v2 previous, the base

    asyncio.run(core.controller.act("canary", "ops", "v4"))
    asyncio.run(core.controller.act("promote", "ops"))

    assert set(core.adapters.resident) == {"base", "v3", "v4"} and core.adapters.previous == "v3"
    assert "remove_lora:v2" in core.engine.calls and len(core.engine.loras) == 3
    ids = [r.lora_int_id for r in core.adapters.resident.values()]
    assert len(set(ids)) == len(ids) and max(ids) == 4  # no two versions share an id


def test_a_request_may_name_the_previous_stable_and_the_base_while_they_stay_resident(
    core: Core, tmp_path: Path
) -> None:
    promote_v2_then_v3(core, tmp_path)
    assert core.slots.served_versions() == ["v3", "base", "v2"]  # /v1/models: stable, then the resident

    for version in ("v2", "base", "v3"):  # no view points at v2 or the base
        assert asyncio.run(core.answer(version)) == (version, expected(core, version))
    assert core.slots.in_flight() == 0 and "remove_lora:v2" not in core.engine.calls

    asyncio.run(core.controller.act("canary", "ops", "v4"))
    asyncio.run(core.controller.act("promote", "ops"))  # v2 is no longer the previous stable: it leaves

    assert core.slots.served_versions() == ["v4", "base", "v3"]
    with pytest.raises(NotFound, match="served: v4, base, v3"):
        asyncio.run(core.answer("v2"))
    assert asyncio.run(core.answer("v3")) == ("v3", expected(core, "v3"))


def test_a_pinned_request_holds_its_adapter_and_one_routed_to_an_adapter_that_left_is_a_404(
    core: Core, tmp_path: Path
) -> None:
    promote_v2_then_v3(core, tmp_path)

    async def scenario() -> None:
        request = GenerationRequest(
            endpoint="chat.completions", model="heed", messages=[{"role": "user", "content": "Hi"}]
        )
        held = await core.completions.prepare(request, "alice", pinned_version="v2")  # v2: the previous stable
        assert core.slots.in_flight() == 1
        await core.controller.act("canary", "ops", "v4")
        await core.controller.act("promote", "ops")  # v2 is no longer kept
        assert "v2" in core.adapters.resident and core.slots.in_flight() == 1  # the request holds it
        result = await core.completions.complete(held)
        assert (result.policy_version, list(result.choices[0].token_ids)) == ("v2", expected(core, "v2"))
        await asyncio.sleep(0)  # the eviction the release scheduled
        await asyncio.sleep(0)
        assert "v2" not in core.adapters.resident and core.slots.in_flight() == 0

        routed = core.slots.for_version("v3")  # the previous stable now: routed, not yet leased
        core.registry.publish(lora_adapter(tmp_path / "v5"), mode="adapter", base="base", parent="v4")
        await core.controller.act("canary", "ops", "v5")
        await core.controller.act("promote", "ops")  # v3 leaves the engine meanwhile
        assert "v3" not in core.adapters.resident
        with pytest.raises(NotFound, match="has left the engine"):
            await routed.lease()
        assert core.slots.in_flight() == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "case",
    ["another base", "a full version", "rank too high", "the engine refuses the files"],
)
def test_a_version_this_engine_cannot_serve_is_refused_and_the_views_stay_as_they_were(
    core: Core, tmp_path: Path, case: str
) -> None:
    if case == "another base":
        core.registry.import_base(policy_folder(tmp_path / "other"), "other")
        core.registry.publish(lora_adapter(tmp_path / "a"), mode="adapter", base="other", parent="base")
        why = "sits on other, not on base"
    elif case == "a full version":
        core.registry.publish(policy_folder(tmp_path / "full", 1.0), parent="base")
        why = "is a full version, and this engine serves adapters of base"
    elif case == "rank too high":
        core.registry.publish(lora_adapter(tmp_path / "a", r=16), mode="adapter", base="base", parent="base")
        why = "rank 16 is above --max-lora-rank 8"
    else:
        core.engine.refuse_lora = True
        core.registry.publish(lora_adapter(tmp_path / "a"), mode="adapter", base="base", parent="base")
        why = "cannot load the adapter"
    version = core.registry.latest().version  # type: ignore[union-attr]

    with pytest.raises(InvalidRequest, match=why):
        asyncio.run(core.controller.act("canary", "ops", version))

    state = load_state(core.data_dir)
    assert state.canary is None and state.history[-1].action == "refused"
    assert version not in core.adapters.resident and version not in core.slots.served_versions()
    assert core.slots.canary is None  # no empty canary view left behind
    assert asyncio.run(core.answer()) == ("base", expected(core, "base"))  # still serving


def test_slots_report_what_the_views_serve(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))

    assert core.slots.served_versions() == ["base", "v2"]
    statuses = {s.name: (s.policy_version, s.ready, s.swapping) for s in core.slots.status()}
    assert statuses == {"stable": ("base", True, False), "canary": ("v2", True, False)}
    assert core.slots.in_flight() == 0


def test_a_view_serves_nothing_until_its_first_version_is_resident(tmp_path: Path, tiny_model: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(tiny_model, "base")
    shared = FakeSlot("engine", registry.verify("base"), "base", object())
    adapters = AdapterEngine(shared, tmp_path / "adapters")
    view = adapters.view("stable", "base")
    view.start()
    assert view.engine is not None and not view.ready  # the engine is up, the base's adapter not yet in

    asyncio.run(view.swap("base", registry.verify("base")))
    assert view.ready and view.lora is adapters.resident["base"]
