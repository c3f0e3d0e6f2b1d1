"""The rollout controller's rule on a real event log and registry: it holds without enough
feedback, advances a canary that users clearly prefer, and never canaries a version trained
from a policy that is no longer stable. (Engines are not involved: no step here swaps weights.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, FeedbackSummary, open_store
from heed.registry import PolicyRegistry
from heed.rollout import RolloutRule, RolloutState, load_state
from serving.controller import RolloutController, probability_better
from serving.engine import EngineSettings, EngineSlot
from serving.metrics import ServiceMetrics
from serving.router import Router
from serving.slots import Slots


def test_the_posterior_probability_follows_the_evidence() -> None:
    even = probability_better(FeedbackSummary(30, 30), FeedbackSummary(300, 300))
    better = probability_better(FeedbackSummary(45, 15), FeedbackSummary(300, 300))
    worse = probability_better(FeedbackSummary(15, 45), FeedbackSummary(300, 300))
    assert 0.4 < even < 0.6 and better > 0.99 and worse < 0.01
    assert probability_better(FeedbackSummary(45, 15), FeedbackSummary(300, 300)) == better  # seeded


def thumbs(store, version: str, up: int, down: int, start: int) -> None:
    for i in range(up + down):
        cid = f"cmpl-{version}-{start + i}"
        choice = ChoiceRecord(0, "a", (2,), "stop")
        store.append_completion(
            CompletionRecord(cid, 0.0, "app", version, "completions", "p", None, (1,), {}, (choice,), 1, 1, 0.1)
        )
        thumb = 1 if i < up else -1
        store.append_feedback(
            FeedbackRecord(f"fb-{cid}", cid, 0.0, "app", "thumb", thumb=thumb, policy_version=version)
        )


@pytest.fixture
def controller(tmp_path: Path):
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    registry = PolicyRegistry(tmp_path / "data" / "registry")
    registry.import_base(folder, "base")
    registry.publish(folder, parent="base")  # v2
    store = open_store(tmp_path / "data" / "events.db")
    rule = RolloutRule(steps=(5, 25, 50, 100), min_feedback_per_step=40, advance_probability=0.95)
    metrics = ServiceMetrics()
    slots = Slots(EngineSlot("stable", folder, "base", EngineSettings()), EngineSettings(), tmp_path / "data", metrics)
    made = RolloutController(
        tmp_path / "data", registry, store, slots, Router(slots, "heed"), metrics, rule, auto_canary=True
    )
    made.state = RolloutState(stable="base", canary="v2", canary_share=5, considered_sequence=2)
    yield made, store, registry, folder
    store.close()


def test_the_controller_holds_until_a_step_has_its_feedback_then_advances_a_better_canary(controller) -> None:
    made, store, _, _ = controller
    thumbs(store, "base", 100, 100, 0)
    thumbs(store, "v2", 20, 5, 0)  # clearly better, but fewer thumbs than the step needs
    asyncio.run(made.judge())
    assert (made.state.step, made.state.canary_share, made.state.history) == (0, 5, ())
    assert made.evidence["canary_thumbs_this_step"] == 25

    thumbs(store, "v2", 20, 5, 100)
    asyncio.run(made.judge())

    assert (made.state.step, made.state.canary_share) == (1, 25)
    advanced = made.state.history[-1]
    assert (advanced.action, advanced.version, advanced.by) == ("advanced", "v2", "controller")
    assert advanced.evidence["p_canary_better"] >= 0.95 and advanced.evidence["canary"]["thumbs_up"] == 40
    assert load_state(made.data_dir) == made.state  # persisted with its evidence
    assert made.state.step_since_seq == store.last_seq()  # the next step counts its own feedback


def test_a_version_trained_from_a_policy_that_is_no_longer_stable_is_not_canaried(controller) -> None:
    made, _, registry, folder = controller
    made.state = RolloutState(stable="v2", considered_sequence=2)  # v2 was promoted meanwhile
    stale = registry.publish(folder, parent="base")  # v3, trained from base

    asyncio.run(made.take_up_new_version())

    refused = made.state.history[-1]
    assert (refused.action, refused.version) == ("refused", stale.version)
    assert "trained from base, but v2 is stable" in refused.reason
    assert made.state.canary is None and made.state.considered_sequence == stale.sequence
