"""The service core without an engine: the completion and feedback services, the router, the
slots and the rollout controller, run for real over a fake engine (tests/fakes.py), a real
tokenizer, a real SQLite event log and a real registry. Fast: no engine boots here."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from heed.callers import sticky_bucket
from heed.datadir import DataDir
from heed.eventlog import EventStore, open_store
from heed.eventlog.sqlite import SQLiteEventStore
from heed.registry import PolicyRegistry
from heed.rollout import RolloutRule, RolloutState, RolloutStatus, load_state, open_rollout_store
from serving.completions import CompletionService, PreparedCompletion
from serving.controller import RolloutController
from serving.engine import EngineSettings
from serving.errors import Conflict, InvalidRequest, NotFound, PermissionDenied, Unavailable
from serving.event_writer import CONFIRM_EVERY_S, PROBE_EVERY_S, EventWriter
from serving.feedback import FeedbackInput, FeedbackService
from serving.grpc.server import _rollout_status, status_code
from serving.metrics import ServiceMetrics
from serving.requests import CompletionResult, GenerationRequest
from serving.router import Router
from serving.service import Health, health
from serving.slots import Slots
from tests.fakes import FakeEngine, FakeSlot, policy_folder


@dataclass
class Core:
    store: EventStore
    registry: PolicyRegistry
    slots: Slots
    router: Router
    controller: RolloutController
    completions: CompletionService
    feedback: FeedbackService
    tokenizer: Any
    data_dir: Path

    def engine(self, slot: str) -> FakeEngine:
        engine = dict(self.slots.items())[slot].engine
        assert isinstance(engine, FakeEngine)
        return engine


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def core(tmp_path: Path, tokenizer: Any) -> Iterator[Core]:
    data = DataDir(tmp_path / "data")
    registry = PolicyRegistry(data.registry)
    registry.import_base(policy_folder(tmp_path / "base", 0.0), "base")
    registry.publish(policy_folder(tmp_path / "v2", 1.0), parent="base")  # v2
    store = open_store(data.events)
    metrics = ServiceMetrics()
    writer = EventWriter(store, metrics)

    def new_slot(name: str, model: Path, version: str, settings: EngineSettings, weights: Path) -> FakeSlot:
        return FakeSlot(name, model, version, tokenizer, weights, settings)

    stable = new_slot(
        "stable", registry.verify("base"), "base", EngineSettings(max_model_len=256), data.engine_weights("stable")
    )
    stable.start()
    slots = Slots(stable, stable.settings, data.root, metrics, new_slot=new_slot)
    router = Router(slots, "heed")
    rule = RolloutRule(steps=(5, 25, 50, 100), min_feedback_per_step=10, min_requests=20)
    rollouts = open_rollout_store(str(data.events), data.root)
    controller = RolloutController(rollouts, registry, store, slots, router, metrics, rule)
    controller.state = RolloutState(stable="base", considered_sequence=1)
    router.follow(controller.state)
    completions = CompletionService(router, writer, metrics, max_n=4)
    yield Core(
        store, registry, slots, router, controller, completions, FeedbackService(writer, metrics), tokenizer, data.root
    )
    writer.close()
    store.close()


USER = {"role": "user", "content": "Hello"}


def chat(content: str = "Hello", n: int = 1, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        endpoint="chat.completions", model="heed", messages=[{"role": "user", "content": content}], n=n, **kw
    )


async def complete(core: Core, request: GenerationRequest, principal: str = "alice") -> CompletionResult:
    prepared = await core.completions.prepare(request, principal)
    return await core.completions.complete(prepared)


# ---- completions ---------------------------------------------------------------------------------


def test_a_completion_is_logged_with_the_ids_served_and_the_version_that_answered(core: Core) -> None:
    result = asyncio.run(complete(core, chat(n=2, max_tokens=3)))

    record = core.store.get_completion(result.completion_id)
    assert record is not None and record.policy_version == "base" == result.policy_version
    assert list(record.prompt_token_ids) == core.engine("stable").prompts[0]  # what the engine was given
    expected = [core.engine("stable").answer(i, 3) for i in range(2)]
    assert [list(c.token_ids) for c in record.choices] == expected
    assert [c.token_ids for c in result.choices] == expected
    assert core.router.traffic("base").requests == 1 and core.router.traffic("base").errors == 0


def test_a_stream_yields_deltas_and_then_the_result_it_logged(core: Core) -> None:
    async def run() -> list[Any]:
        prepared = await core.completions.prepare(chat(max_tokens=3, stream=True), "alice")
        return [item async for item in core.completions.stream(prepared)]

    items = asyncio.run(run())

    *deltas, result = items
    assert isinstance(result, CompletionResult) and len(deltas) == 3
    assert "".join(d[0].text for d in deltas) == result.choices[0].text
    assert core.store.get_completion(result.completion_id) is not None


def test_a_stream_the_caller_abandons_is_still_logged_as_aborted(core: Core) -> None:
    async def run() -> str:
        prepared = await core.completions.prepare(chat(max_tokens=3, stream=True), "alice")
        stream = core.completions.stream(prepared)
        await anext(stream)  # one delta, then the caller goes away
        await stream.aclose()
        await asyncio.gather(*core.completions._pending)
        return prepared.completion_id

    completion_id = asyncio.run(run())

    record = core.store.get_completion(completion_id)
    assert record is not None and record.choices[0].finish_reason == "abort"
    assert not core.slots.stable._leases  # the lease went with it


def test_a_stream_cancelled_while_its_log_write_commits_is_logged_once_and_the_log_stays_writable(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller goes away (a disconnect, a cancelled RPC) just as the answer is being logged: the
    write commits, and nothing writes the same completion a second time (which the log refuses as
    a duplicate: the service would call the log unwritable and refuse everyone for a while)."""
    writing, release = threading.Event(), threading.Event()
    append = core.store.append_completion

    def slow_append(record: Any) -> int:
        writing.set()
        assert release.wait(10)
        return append(record)

    monkeypatch.setattr(core.store, "append_completion", slow_append)

    async def run() -> str:
        prepared = await core.completions.prepare(chat(max_tokens=3, stream=True), "alice")

        async def consume() -> None:
            async for _ in core.completions.stream(prepared):
                pass

        task = asyncio.create_task(consume())
        while not writing.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # while the write is on the writer's thread
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.gather(*core.completions._pending)
        return prepared.completion_id

    completion_id = asyncio.run(run())

    record = core.store.get_completion(completion_id)
    assert record is not None and record.choices[0].finish_reason == "length"  # what was generated, whole
    assert core.store.last_seq() == 1  # logged once
    assert core.completions.writer.failure is None
    assert not core.slots.stable._leases


def test_an_engine_failure_counts_against_the_version_and_logs_nothing(core: Core) -> None:
    core.engine("stable").fail = True
    with pytest.raises(RuntimeError):
        asyncio.run(complete(core, chat()))
    assert core.router.traffic("base").errors == 1
    assert core.store.last_seq() == 0
    assert not core.slots.stable._leases


def test_a_prompt_past_the_context_is_refused_before_anything_is_leased(core: Core) -> None:
    with pytest.raises(InvalidRequest) as refused:
        asyncio.run(complete(core, chat("word " * 400)))
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest) as long_one:  # tokenized on a thread, off the event loop
        asyncio.run(complete(core, chat("word " * 4000)))
    assert long_one.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest) as too_many:
        asyncio.run(complete(core, chat(max_tokens=250)))
    assert too_many.value.param == "max_tokens"
    assert not core.slots.stable._leases and core.engine("stable").prompts == []


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat(seed=2**64), "seed"),
        (chat(seed=-(2**63) - 1), "seed"),
        (chat("a\ud800b"), "messages[0].content"),
        (chat(stop=["\udfff"]), "stop[0]"),
        (chat(user="\ud83d"), "user"),
        (GenerationRequest(endpoint="completions", model="heed", prompt="\udc00"), "prompt"),
        (chat(temperature=float("nan")), "temperature"),
        (chat(top_k=-2), "top_k"),
        (chat(top_k=10**6), "top_k"),  # past the vocabulary
        (chat(min_p=1.5), "min_p"),
        (chat(repetition_penalty=0.0), "repetition_penalty"),
        (chat(min_tokens=5, max_tokens=2), "min_tokens"),
        (chat(min_tokens=10**6), "min_tokens"),  # past the context left, which max_tokens defaults to
        (chat(logit_bias={10**9: 1.0}), "logit_bias"),
        (chat(logit_bias={1: 500.0}), "logit_bias[1]"),
        (chat(logit_bias={1: float("inf")}), "logit_bias[1]"),
        (chat(stop_token_ids=[-1]), "stop_token_ids"),
        (chat(stop_token_ids=list(range(65))), "stop_token_ids"),
    ],
    ids=[
        "seed-2**64",
        "seed-below-int64",
        "surrogate-content",
        "surrogate-stop",
        "surrogate-user",
        "surrogate-prompt",
        "temperature-nan",
        "top-k-below-minus-one",
        "top-k-past-vocab",
        "min-p-above-one",
        "repetition-penalty-zero",
        "min-tokens-above-max",
        "min-tokens-past-the-context",
        "logit-bias-past-vocab",
        "logit-bias-too-large",
        "logit-bias-infinite",
        "stop-token-id-negative",
        "too-many-stop-token-ids",
    ],
)
def test_what_the_engine_would_refuse_is_the_callers_error_and_no_versions(
    core: Core, request_: GenerationRequest, param: str
) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    with pytest.raises(InvalidRequest) as refused:
        asyncio.run(core.completions.prepare(request_, "alice", pinned_version="v2"))
    assert refused.value.param == param
    assert core.router.traffic("v2").requests == 0  # nothing counted against the canary
    assert core.engine("canary").prompts == [] and not core.slots.stable._leases


# ---- routing -------------------------------------------------------------------------------------


def test_a_caller_stays_on_its_side_while_the_canary_share_grows(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    users = [f"user-{i}" for i in range(400)]

    def sides() -> dict[str, str]:
        return {u: core.router.route("heed", u, "alice").policy_version for u in users}

    at_5 = sides()
    asyncio.run(core.controller._advance("ops", "test"))
    at_25 = sides()

    assert at_5 == {u: "v2" if sticky_bucket(u) < 500 else "base" for u in users}
    assert at_25 == {u: "v2" if sticky_bucket(u) < 2500 else "base" for u in users}
    assert all(at_25[u] == "v2" for u in users if at_5[u] == "v2")  # nobody on the canary goes back
    assert 60 < sum(v == "v2" for v in at_25.values()) < 140


def test_a_named_or_pinned_version_is_served_and_an_unknown_one_is_not_found(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    assert core.router.route("v2", None, "alice").name == "canary"
    assert core.router.route("heed", None, "alice", pinned="v2").name == "canary"
    assert core.router.route("base", None, "alice", pinned="v2").name == "stable"  # the model named wins
    with pytest.raises(NotFound) as missing:
        core.router.route("v9", None, "alice")
    assert missing.value.code == "model_not_found" and "base, v2" in str(missing.value)


def test_only_the_principals_allowed_to_pin_may_pick_the_version_that_answers(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    service = CompletionService(
        core.router, core.completions.writer, ServiceMetrics(), max_n=4, may_pin=lambda principal: principal == "ops"
    )
    for request, pinned in ((chat(), "v2"), (GenerationRequest("chat.completions", "v2", messages=[USER]), None)):
        with pytest.raises(PermissionDenied) as refused:
            asyncio.run(service.prepare(request, "mallory", pinned_version=pinned))
        assert refused.value.code == "pin_not_allowed"
        prepared = asyncio.run(service.prepare(request, "ops", pinned_version=pinned))
        assert prepared.policy_version == "v2"
        prepared.lease.release()
    with pytest.raises(NotFound):  # an unknown version is still a 404, whoever asks
        asyncio.run(service.prepare(GenerationRequest("chat.completions", "v9", messages=[USER]), "mallory"))
    split = asyncio.run(service.prepare(chat(), "mallory"))  # the alias: the rollout's split decides
    assert split.policy_version in ("base", "v2")
    split.lease.release()
    assert core.router.traffic("v2").requests == 0


def test_a_slot_whose_engine_is_not_up_is_unavailable(core: Core) -> None:
    core.engine("stable").errored = True
    with pytest.raises(Unavailable):
        core.router.route("heed", None, "alice")


# ---- the controller -------------------------------------------------------------------------------


def test_a_canary_whose_error_rate_passes_the_limit_is_rolled_back_and_its_slot_returns_to_stable(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    for i in range(20):
        core.router.observe("v2", 0.1, error=i < 2)  # 10% > 5%

    asyncio.run(core.controller.judge())

    state = load_state(core.data_dir)  # the decision is durable
    assert state.canary is None and state.history[-1].action == "rolled_back"
    assert "error rate" in state.history[-1].reason
    canary = core.slots.canary
    assert canary is not None and canary.policy_version == "base"  # swapped back in place
    assert "reload_weights:next" in core.engine("canary").calls
    assert core.router.route("heed", "anyone", "alice").name == "stable"


def test_an_adapter_version_is_refused_as_canary_by_a_full_weight_server_with_what_to_do(
    core: Core, tmp_path: Path
) -> None:
    from serving.errors import InvalidRequest
    from tests.loop.test_registry import lora_adapter

    core.registry.publish(lora_adapter(tmp_path / "adapter"), mode="adapter", base="base")  # v3
    with pytest.raises(InvalidRequest, match=r"LoRA adapter on base.*heed registry merge v3"):
        asyncio.run(core.controller.act("canary", "ops", "v3"))

    state = load_state(core.data_dir)
    assert state.canary is None and state.history[-1].action == "refused"
    assert core.slots.canary is None or core.slots.canary.policy_version == "base"
    assert core.router.route("heed", "anyone", "alice").name == "stable"  # still serving


def answer_and_thumb(core: Core, version: str, thumb: int, user: str) -> None:
    """``version`` answers ``user`` of alice's app, and the user gives the answer ``thumb``."""

    async def run() -> None:
        prepared = await core.completions.prepare(chat(user=user), "alice", pinned_version=version)
        result = await core.completions.complete(prepared)
        await core.feedback.submit(FeedbackInput(result.completion_id, thumb=thumb), "alice")

    asyncio.run(run())


def test_thumbs_through_the_services_that_favour_the_canary_advance_it(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    for i in range(12):  # twelve end users of one app key: no one caller above the 25% cap
        answer_and_thumb(core, "base", 1 if i < 4 else -1, f"user-{i}")
        answer_and_thumb(core, "v2", 1, f"user-{i}")
    asyncio.run(core.controller.judge())

    state = core.controller.state
    assert (state.step, state.canary_share, state.history[-1].action) == (1, 25, "advanced")
    evidence = state.history[-1].evidence
    assert (evidence["canary"]["thumbs_up"], evidence["stable"]["thumbs_down"]) == (12, 8)
    assert evidence["canary"]["requests"] == 12 and evidence["p_canary_better"] > 0.95


def test_a_key_not_trusted_to_name_its_users_is_one_caller_whatever_users_it_names(core: Core) -> None:
    """The test above, from a key that may not name end users (--user-principals): its twelve
    users are one caller, who alone carries no evidence, and they are routed as one."""
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    service = CompletionService(
        core.router, core.completions.writer, ServiceMetrics(), max_n=4, may_name_users=lambda p: p == "app"
    )

    async def answer_and_thumb(principal: str, version: str, thumb: int, user: str) -> str:
        result = await service.complete(await service.prepare(chat(user=user), principal, pinned_version=version))
        await core.feedback.submit(FeedbackInput(result.completion_id, thumb=thumb), principal)
        return result.completion_id

    ids = []
    for i in range(12):
        ids.append(asyncio.run(answer_and_thumb("mallory", "base", -1, f"user-{i}")))
        ids.append(asyncio.run(answer_and_thumb("mallory", "v2", 1, f"user-{i}")))
    asyncio.run(core.controller.judge())
    assert core.controller.state.step == 0 and core.controller.state.history[-1].action == "canary_started"
    votes = core.store.thumb_votes()
    assert {(v.principal, v.user, v.up + v.down) for v in votes} == {("mallory", "mallory", 12)}
    logged = core.store.get_completion(ids[0])
    assert (logged.user, logged.caller, logged.evidence_caller) == ("user-0", "mallory", "mallory")  # still logged

    trusted = core.store.get_completion(asyncio.run(answer_and_thumb("app", "v2", 1, "user-0")))
    assert (trusted.caller, trusted.evidence_caller) == (None, "user-0")
    assert ("app", "user-0", 1) in {(v.principal, v.user, v.up + v.down) for v in core.store.thumb_votes()}

    asyncio.run(core.controller._advance("ops", "test"))  # the split at 25%: mallory's users all on one side
    sides = set()
    for i in range(40):
        prepared = asyncio.run(service.prepare(chat(user=f"user-{i}"), "mallory"))
        sides.add(prepared.policy_version)
        prepared.lease.release()
    assert sides == {"v2" if sticky_bucket("mallory") < 2500 else "base"}


def test_a_canary_still_undecided_after_its_time_limit_is_rolled_back(core: Core) -> None:
    """Too few callers (or too even thumbs) never decide a canary, and the trainer waits for the
    decision: past --max-canary-hours the controller rolls it back, and stable stays."""
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    asyncio.run(core.controller.judge())
    assert core.controller.state.canary == "v2"  # no evidence, within the limit: it waits

    started = core.controller.state.history[-1]
    assert started.action == "canary_started"
    long_ago = dataclasses.replace(started, time=started.time - 25 * 3600)
    core.controller.state = dataclasses.replace(
        core.controller.state, history=(*core.controller.state.history[:-1], long_ago)
    )
    core.controller.rule = dataclasses.replace(core.controller.rule, max_canary_hours=0)  # 0: no limit
    asyncio.run(core.controller.judge())
    assert core.controller.state.canary == "v2"

    core.controller.rule = dataclasses.replace(core.controller.rule, max_canary_hours=24)
    paused = asyncio.run(core.controller.act("pause", "ops")).state
    asyncio.run(core.controller.judge())
    assert core.controller.state.canary == "v2"  # paused: not timed out
    asyncio.run(core.controller.act("resume", "ops"))
    asyncio.run(core.controller.judge())
    assert core.controller.state.canary == "v2" and paused.paused  # the wait starts again at the resume

    state = core.controller.state
    core.controller.state = dataclasses.replace(state, history=tuple(
        dataclasses.replace(d, time=d.time - 25 * 3600) if d.action in ("paused", "resumed") else d
        for d in state.history
    ))  # fmt: skip
    asyncio.run(core.controller.judge())
    rolled = core.controller.state.history[-1]
    assert (rolled.action, rolled.version, rolled.by) == ("rolled_back", "v2", "controller")
    assert rolled.reason.startswith("undecided after 25.0 h at 5% (limit 24 h")
    assert rolled.evidence["rule"] == "time_limit"
    assert core.controller.state.canary is None and core.controller.state.stable == "base"


def even_thumbs(core: Core, users: range) -> None:
    """Each version answers each of ``users``: half of them like it, half do not."""
    for i in users:
        answer_and_thumb(core, "base", 1 if i % 2 else -1, f"user-{i}")
        answer_and_thumb(core, "v2", 1 if i % 2 else -1, f"user-{i}")


def test_a_canary_whose_thumbs_stay_even_is_rolled_back_once_its_step_has_the_most_thumbs(core: Core) -> None:
    """Thumbs too even to tell the versions apart never decide a canary, however many come: at
    --max-feedback-per-step thumbs on it in one step, the controller rolls it back, and stable
    stays; thumbs that do tell them apart decide first."""
    rule = core.controller.rule
    core.controller.rule = dataclasses.replace(rule, max_feedback_per_step=30)
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    even_thumbs(core, range(20))
    asyncio.run(core.controller.judge())
    assert core.controller.evidence["canary_thumbs_this_step"] == 20  # past the 10 a decision needs
    assert core.controller.state.canary == "v2" and core.controller.state.history[-1].action == "canary_started"

    even_thumbs(core, range(20, 30))
    core.controller.rule = dataclasses.replace(rule, max_feedback_per_step=0)  # 0: no cap
    asyncio.run(core.controller.judge())
    assert core.controller.state.canary == "v2"

    core.controller.rule = dataclasses.replace(rule, max_feedback_per_step=30)
    asyncio.run(core.controller.judge())
    rolled = core.controller.state.history[-1]
    assert (rolled.action, rolled.version, rolled.by) == ("rolled_back", "v2", "controller")
    assert rolled.reason.startswith("undecided after 30 thumbs at 5% (limit 30; P(canary better) = ")
    assert 0.4 < core.controller.evidence["p_canary_better"] < 0.6
    decisions = core.controller.metrics.registry.get_sample_value  # a cap's rollback, told from the rest
    assert decisions("heed_rollout_decisions_total", {"action": "rolled_back", "rule": "feedback_limit"}) == 1
    assert decisions("heed_rollout_decisions_total", {"action": "canary_started", "rule": ""}) == 1
    assert decisions("heed_rollout_decisions_total", {"action": "rolled_back", "rule": "p_worse"}) == 0  # there, at 0
    assert core.controller.state.canary is None and core.controller.state.stable == "base"

    # A canary the thumbs favour, past the cap at its first look: it advances.
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    for i in range(30, 62):
        answer_and_thumb(core, "base", 1 if i % 2 else -1, f"user-{i}")
        answer_and_thumb(core, "v2", 1, f"user-{i}")
    asyncio.run(core.controller.judge())
    assert (core.controller.state.history[-1].action, core.controller.state.canary_share) == ("advanced", 25)
    assert core.controller.state.history[-1].evidence["rule"] == "p_better"
    assert decisions("heed_rollout_decisions_total", {"action": "advanced", "rule": "p_better"}) == 1


def test_an_advance_and_a_resume_start_the_steps_count_of_thumbs_again(core: Core) -> None:
    """The cap counts one step's thumbs: those before an advance, or before a resume (the canary
    kept its share while paused), do not count towards it."""
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    even_thumbs(core, range(32))
    asyncio.run(core.controller._advance("ops", "test"))  # 25%, the canary's 32 thumbs in the step before
    core.controller.rule = dataclasses.replace(core.controller.rule, max_feedback_per_step=30)
    asyncio.run(core.controller.judge())
    assert core.controller.evidence["canary_thumbs_this_step"] == 0
    assert (core.controller.state.canary, core.controller.state.canary_share) == ("v2", 25)

    asyncio.run(core.controller.act("pause", "ops"))
    even_thumbs(core, range(32, 64))
    asyncio.run(core.controller.act("resume", "ops"))
    asyncio.run(core.controller.judge())
    assert core.controller.evidence["canary_thumbs_this_step"] == 0
    assert (core.controller.state.canary, core.controller.state.canary_share) == ("v2", 25)

    even_thumbs(core, range(64, 94))
    asyncio.run(core.controller.judge())
    rolled = core.controller.state.history[-1]
    assert (rolled.action, rolled.version) == ("rolled_back", "v2")
    assert rolled.reason.startswith("undecided after 30 thumbs at 25% (limit 30; ")


def test_promote_swaps_the_stable_slot_and_every_surface_renders_one_status(core: Core) -> None:
    asyncio.run(core.controller.act("canary", "ops", "v2"))
    status = asyncio.run(core.controller.act("promote", "ops"))

    assert (status.state.stable, status.state.canary) == ("v2", None)
    assert core.slots.stable.policy_version == "v2"
    assert [d.action for d in status.state.history] == ["canary_started", "promoted"]
    as_json = status.to_json()
    assert RolloutStatus.from_json(as_json) == status  # what `heed rollout status` reads back
    assert as_json["object"] == "rollout" and as_json["slots"]["stable"]["policy_version"] == "v2"
    grpc_status = _rollout_status(status)
    assert (grpc_status.stable, grpc_status.canary, len(grpc_status.history)) == ("v2", "", 2)


def test_admin_actions_that_cannot_apply_are_refused_and_change_nothing(core: Core) -> None:
    with pytest.raises(Conflict) as no_canary:
        asyncio.run(core.controller.act("promote", "ops"))
    assert status_code(no_canary.value) == grpc.StatusCode.FAILED_PRECONDITION  # 409 over HTTP
    with pytest.raises(InvalidRequest):
        asyncio.run(core.controller.act("canary", "ops", None))
    with pytest.raises(InvalidRequest):
        asyncio.run(core.controller.act("canary", "ops", "base"))  # already stable
    with pytest.raises(InvalidRequest):
        asyncio.run(core.controller.act("canary", "ops", "v9"))  # not published: refused, recorded
    assert [d.action for d in core.controller.state.history] == ["refused"]
    assert core.controller.state.canary is None and core.slots.canary is None

    paused = asyncio.run(core.controller.act("pause", "ops"))
    assert paused.state.paused and paused.state.history[-1].by == "ops"

    core.controller.revision -= 1  # as if another replica had written the rollout since this one read it
    with pytest.raises(Conflict) as stale:
        asyncio.run(core.controller._save(dataclasses.replace(core.controller.state, paused=False)))
    assert stale.value.code == "rollout_changed" and status_code(stale.value) == grpc.StatusCode.ABORTED


# ---- feedback ------------------------------------------------------------------------------------


def test_feedback_is_logged_once_per_key_and_only_by_the_completions_owner(core: Core) -> None:
    result = asyncio.run(complete(core, chat()))
    thumb = FeedbackInput(result.completion_id, thumb=1, idempotency_key="k1")

    first, replayed_first = asyncio.run(core.feedback.submit(thumb, "alice"))
    again, replayed_again = asyncio.run(core.feedback.submit(thumb, "alice"))

    assert (replayed_first, replayed_again) == (False, True) and again.feedback_id == first.feedback_id
    assert first.policy_version == "base" and len(core.store.feedback_for(result.completion_id)) == 1
    with pytest.raises(PermissionDenied):
        asyncio.run(core.feedback.submit(FeedbackInput(result.completion_id, thumb=-1), "bob"))
    with pytest.raises(Conflict):
        asyncio.run(core.feedback.submit(FeedbackInput(result.completion_id, thumb=-1, idempotency_key="k1"), "alice"))
    with pytest.raises(InvalidRequest):
        asyncio.run(core.feedback.submit(FeedbackInput(result.completion_id, ranking=[0]), "alice"))  # n = 1


# ---- swaps and the version asked for ------------------------------------------------------------


def test_a_request_waits_for_a_swap_only_so_long_and_never_gets_another_version_than_it_asked(
    core: Core,
) -> None:
    stable = core.slots.stable
    stable.settings = dataclasses.replace(stable.settings, lease_timeout_s=0.3)

    async def during_a_swap() -> None:
        stable._open.clear()  # a swap is under way
        with pytest.raises(Unavailable) as waited:
            await core.completions.prepare(chat(), "alice")
        assert waited.value.code == "swap_in_progress"

        asked = asyncio.ensure_future(core.completions.prepare(chat(), "alice", pinned_version="base"))
        await asyncio.sleep(0.05)
        stable.policy_version = "v2"  # the swap ends with another version in the slot (a promote)
        stable._open.set()
        with pytest.raises(Unavailable) as moved:
            await asked
        assert moved.value.code == "version_changed"
        alias = await core.completions.prepare(chat(), "alice")  # the alias takes whatever serves now
        assert alias.policy_version == "v2"
        alias.lease.release()

    asyncio.run(during_a_swap())
    assert not stable._leases


def test_a_swap_whose_drain_times_out_aborts_what_still_runs_instead_of_waiting_for_it(core: Core) -> None:
    stable = core.slots.stable
    stable.settings = dataclasses.replace(stable.settings, drain_timeout_s=0.2)

    async def swap_under_a_stuck_request() -> tuple[PreparedCompletion, float]:
        stuck = await core.completions.prepare(chat(), "alice")  # leased, and never finishes
        started = time.monotonic()
        await stable.swap("v2", core.registry.verify("v2"))
        return stuck, time.monotonic() - started

    stuck, took = asyncio.run(swap_under_a_stuck_request())
    assert took < 5 and stable.policy_version == "v2"
    assert "pause:abort" in core.engine("stable").calls  # not "pause:wait", which waits without a deadline
    assert stuck.lease.revoked and not stable._leases


def test_past_its_in_flight_limit_the_service_sheds_load_at_once(core: Core) -> None:
    metrics = ServiceMetrics()
    service = CompletionService(core.router, core.completions.writer, metrics, max_n=4, max_in_flight=2)

    async def fill() -> None:
        held = [await service.prepare(chat(), "alice") for _ in range(2)]
        with pytest.raises(Unavailable) as shed:
            await service.prepare(chat(), "alice")
        assert shed.value.code == "overloaded"
        held.pop().lease.release()
        (await service.prepare(chat(), "alice")).lease.release()  # room again
        held.pop().lease.release()

    asyncio.run(fill())
    assert metrics.registry.get_sample_value("heed_requests_rejected_total", {"reason": "overloaded"}) == 1
    assert core.slots.in_flight() == 0


# ---- the warm canary slot ----------------------------------------------------------------------


def test_the_warm_canary_slot_starts_only_after_a_quiet_moment(core: Core) -> None:
    async def scenario() -> None:
        await asyncio.sleep(0.4)  # up a while without requests
        core.slots.warm_canary(when_idle_s=0.3)
        await asyncio.sleep(0.1)
        lease = await core.slots.stable.lease()  # the first request, just after /ready
        await asyncio.sleep(0.6)
        assert core.slots.canary is None  # busy all along: no warm-up
        lease.release()
        await asyncio.sleep(0.1)
        assert core.slots.canary is None and 0.05 < core.slots.idle_for() < 0.3  # quiet, not long enough
        deadline = time.monotonic() + 5
        while core.slots.canary is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert core.slots.canary.policy_version == "base" and core.slots.canary.ready

    asyncio.run(scenario())


def test_a_canary_that_comes_before_the_quiet_moment_starts_its_own_engine(core: Core) -> None:
    async def scenario() -> None:
        lease = await core.slots.stable.lease()
        core.slots.warm_canary(when_idle_s=0.3)
        await asyncio.wait_for(core.slots.load("canary", "v2", core.registry.verify("v2")), timeout=5)
        assert core.slots.canary is not None and core.slots.canary.policy_version == "v2"
        lease.release()
        await asyncio.sleep(0.8)
        assert core.slots.canary.policy_version == "v2"  # the warm-up gave way: nothing replaced it
        assert await core.slots.close(timeout_s=2) is False

    asyncio.run(scenario())


# ---- health -------------------------------------------------------------------------------------


def test_an_unwritable_log_is_a_counted_503_and_not_ready_until_it_takes_writes_again(core: Core) -> None:
    store = SQLiteEventStore(core.data_dir / "events.db", busy_timeout_s=0.2)  # the core's log file
    metrics = ServiceMetrics()
    writer = EventWriter(store, metrics)
    service = CompletionService(core.router, writer, metrics, max_n=4)
    feedback = FeedbackService(writer, metrics)

    async def complete_one() -> CompletionResult:
        return await service.complete(await service.prepare(chat(), "alice"))

    answered = asyncio.run(complete_one())
    holder = sqlite3.connect(core.data_dir / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(Unavailable) as refused:
            asyncio.run(complete_one())
        assert refused.value.code == "event_log_unavailable"
        with pytest.raises(Unavailable):
            asyncio.run(feedback.submit(FeedbackInput(answered.completion_id, thumb=1), "alice"))
        for kind in ("completion", "feedback"):
            assert metrics.registry.get_sample_value("heed_event_log_write_failures_total", {"type": kind}) == 1
        assert metrics.registry.get_sample_value("heed_event_log_writable") == 0
        now = asyncio.run(health(core.slots, writer))
        assert now.live and not now.ready and "locked" in (now.event_log_error or "")
        writer._probed = 0.0  # probe now: still locked, still not ready
        assert not asyncio.run(health(core.slots, writer)).ready
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    writer._probed = 0.0
    assert asyncio.run(health(core.slots, writer)).ready  # the probe found it writable: ready again
    asyncio.run(complete_one())
    assert [e.record.completion_id for e in store.read()][0] == answered.completion_id and store.last_seq() == 2
    assert core.router.traffic("base").errors == 0  # the log's failure is not the version's
    writer.close()


async def timed_thumbs(feedback: FeedbackService, completion_id: str, count: int) -> list[tuple[str, float]]:
    """``count`` thumbs up from alice at once: each one's outcome ("ok" or the 503's code) and seconds."""

    async def one() -> tuple[str, float]:
        started = time.monotonic()
        try:
            await feedback.submit(FeedbackInput(completion_id, thumb=1), "alice")
        except Unavailable as exc:
            return str(exc.code), time.monotonic() - started
        return "ok", time.monotonic() - started

    return await asyncio.gather(*(one() for _ in range(count)))


def test_a_stuck_log_refuses_writes_at_once_past_its_queue_and_between_probes(core: Core) -> None:
    store = SQLiteEventStore(core.data_dir / "events.db", busy_timeout_s=1.0)
    metrics = ServiceMetrics()
    writer = EventWriter(store, metrics, max_pending=1)
    feedback = FeedbackService(writer, metrics)
    answered = asyncio.run(complete(core, chat()))
    holder = sqlite3.connect(core.data_dir / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")

    try:
        # Which of the three reaches the writer first is the threads' race (each reads its
        # completion on one): that one waits out the busy timeout, the other two are refused at once.
        answers = asyncio.run(timed_thumbs(feedback, answered.completion_id, 3))
        assert sorted(code for code, _ in answers) == ["event_log_busy"] * 2 + ["event_log_unavailable"]
        assert all(s < 0.5 for code, s in answers if code == "event_log_busy")
        started = time.monotonic()  # the log is known unwritable and was probed just now: at once
        with pytest.raises(Unavailable) as refused:
            asyncio.run(feedback.submit(FeedbackInput(answered.completion_id, thumb=1), "alice"))
        assert refused.value.code == "event_log_unavailable" and time.monotonic() - started < 0.5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    writer._probed = 0.0
    asyncio.run(feedback.submit(FeedbackInput(answered.completion_id, thumb=1), "alice"))  # a probe, then the write
    assert metrics.registry.get_sample_value("heed_event_log_write_failures_total", {"type": "feedback"}) == 4
    writer.close()


def test_the_writes_queued_behind_one_that_found_the_log_stuck_are_refused_at_once(core: Core) -> None:
    """Six thumbs reach a stuck log at once: the first waits out the busy timeout (1 s); the five
    queued behind it are refused as soon as it fails, not each after its own busy timeout."""
    store = SQLiteEventStore(core.data_dir / "events.db", busy_timeout_s=1.0)
    writer = EventWriter(store, ServiceMetrics())
    feedback = FeedbackService(writer, writer.metrics)
    answered = asyncio.run(complete(core, chat()))
    holder = sqlite3.connect(core.data_dir / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")

    try:
        answers = asyncio.run(timed_thumbs(feedback, answered.completion_id, 6))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [code for code, _ in answers] == ["event_log_unavailable"] * 6
    assert max(s for _, s in answers) < 1.8, answers  # one busy timeout in all, not six in turn
    assert writer.metrics.registry.get_sample_value("heed_event_log_write_failures_total", {"type": "feedback"}) == 6
    writer.close()


def test_an_idle_server_notices_a_log_that_broke_meanwhile_by_a_probe(core: Core) -> None:
    """Readiness trusts the last successful write for CONFIRM_EVERY_S; when nothing was written for
    longer (an idle replica), it probes the log, so a log locked or full meanwhile is not ready."""
    store = SQLiteEventStore(core.data_dir / "events.db", busy_timeout_s=1.0)
    writer = EventWriter(store, ServiceMetrics())
    assert asyncio.run(health(core.slots, writer)).ready  # probed: nothing was written yet
    holder = sqlite3.connect(core.data_dir / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert asyncio.run(writer.writable())  # confirmed just now: not probed again
        writer._confirmed -= CONFIRM_EVERY_S  # nothing written since
        told = asyncio.run(health(core.slots, writer))
        assert not told.ready and "locked" in (told.event_log_error or "")
        assert writer.metrics.registry.get_sample_value("heed_event_log_writable") == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    writer._probed -= PROBE_EVERY_S
    assert asyncio.run(health(core.slots, writer)).ready
    writer.close()


def test_a_dead_engine_fails_liveness_and_readiness(core: Core) -> None:
    writer = core.completions.writer
    assert asyncio.run(health(core.slots, writer)) == Health(True, True, [], None)
    core.engine("stable").errored = True
    now = asyncio.run(health(core.slots, writer))
    assert (now.live, now.ready, now.dead_engines) == (False, False, ["stable"])


def test_engine_gauges_follow_a_slots_version_across_a_swap() -> None:
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    step = SimpleNamespace(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.25)
    iteration = SimpleNamespace(
        num_preempted_reqs=1,
        time_to_first_tokens_iter=[0.2],
        inter_token_latencies_iter=[0.05, 0.06],
        finished_requests=[SimpleNamespace(queued_time=0.01)],
    )
    metrics.observe_engine("stable", "v1", step, iteration)
    metrics.observe_engine(
        "stable", "v2", SimpleNamespace(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0), None
    )

    series = {
        (s.name, s.labels.get("policy_version")): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name.startswith("heed_engine_") and s.labels.get("slot") == "stable"
    }
    assert ("heed_engine_requests_running", "v1") not in series  # the swapped-out version's gauges are gone
    assert series[("heed_engine_requests_running", "v2")] == 0
    assert series[("heed_engine_preemptions_total", "v1")] == 1  # counters keep their history
    assert series[("heed_engine_inter_token_latency_seconds_count", "v1")] == 2


def test_an_idle_or_swapped_slot_reports_a_quiet_engine_under_the_version_it_serves(core: Core) -> None:
    stable = core.slots.stable
    seen: list[tuple[str, str, int, int]] = []
    stable.on_stats = lambda slot, version, scheduler, _: seen.append(
        (slot, version, scheduler.num_running_reqs, scheduler.num_waiting_reqs)
    )
    busy = SimpleNamespace(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.5)

    async def serve_then_swap() -> None:
        first = await core.completions.prepare(chat(), "alice")
        second = await core.completions.prepare(chat(), "alice")
        stable.on_stats("stable", stable.policy_version, busy, None)  # as vLLM's logger does on a step
        first.lease.release()
        assert seen[-1][2:] == (2, 1)  # one request still runs: the last step's figures stand
        second.lease.release()
        assert seen[-1] == ("stable", "base", 0, 0)  # nothing runs: the gauges say so, not the last step
        await stable.swap("v2", core.registry.verify("v2"))

    asyncio.run(serve_then_swap())
    assert seen[-1] == ("stable", "v2", 0, 0)  # the new version's labels at once, not at its first step


def test_records_leave_unset_later_fields_out_so_a_reader_of_the_version_before_loads_them() -> None:
    from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord

    completion = CompletionRecord(
        completion_id="cmpl-1",
        created=1.0,
        principal="app",
        policy_version="v1",
        endpoint="completions",
        prompt="hi",
        messages=None,
        prompt_token_ids=(1, 2),
        params={},
        choices=(ChoiceRecord(0, "yo", (3,), "stop"),),
        prompt_tokens=2,
        completion_tokens=1,
        latency_s=0.1,
    )
    thumb = FeedbackRecord(
        feedback_id="fb-1", completion_id="cmpl-1", created=2.0, principal="app", kind="thumb", thumb=1
    )
    traced = dataclasses.replace(completion, trace={"request_id": "r1"})

    data = completion.to_json()
    assert "trace" not in data and "tool_calls" not in data["choices"][0]
    assert not {"key", "data_type", "score", "category", "metadata", "source", "trace"} & set(thumb.to_json())
    assert CompletionRecord.from_json(data) == completion and FeedbackRecord.from_json(thumb.to_json()) == thumb
    assert CompletionRecord.from_json(traced.to_json()).trace == {"request_id": "r1"}
