"""The rollout controller's rule on a real event log and registry: it holds without enough
feedback, advances a canary that users clearly prefer, and never canaries a version trained
from a policy that is no longer stable. (Engines are not involved: no step here swaps weights.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from heed.eventlog import CallerThumbs, ChoiceRecord, CompletionRecord, FeedbackRecord, open_store
from heed.registry import PolicyRegistry
from heed.rollout import HISTORY_KEPT, RolloutRule, RolloutState, decision, load_state, open_rollout_store
from serving.controller import RolloutController, Thumbs, capped_thumbs, probability_better
from serving.engine import EngineSettings, EngineSlot
from serving.errors import Conflict
from serving.metrics import ServiceMetrics
from serving.router import Router
from serving.slots import Slots


def test_the_posterior_probability_follows_the_evidence() -> None:
    even = probability_better(Thumbs(30, 30), Thumbs(300, 300))
    better = probability_better(Thumbs(45, 15), Thumbs(300, 300))
    worse = probability_better(Thumbs(15, 45), Thumbs(300, 300))
    assert 0.4 < even < 0.6 and better > 0.99 and worse < 0.01
    assert probability_better(Thumbs(45, 15), Thumbs(300, 300)) == better  # seeded


def votes(*counts: tuple[int, int]) -> list[CallerThumbs]:
    return [CallerThumbs("v2", "app", f"u{i}", up, down) for i, (up, down) in enumerate(counts)]


def test_no_caller_carries_more_than_its_share_of_the_thumbs() -> None:
    fair = capped_thumbs(votes(*[(8, 2)] * 5), 0.25)  # five callers of ten votes: nobody above 25%
    assert (fair.thumbs_up, fair.thumbs_down, fair.votes, fair.callers) == (40, 10, 50, 5)

    alone = capped_thumbs(votes((50, 0)), 0.25)  # one caller, however many votes: no evidence
    assert alone.thumbs == 0 and alone.votes == 50
    assert capped_thumbs(votes((50, 0), (40, 0), (30, 0)), 0.25).thumbs == 0  # three: still fewer than 1/0.25

    flood = capped_thumbs(votes((50, 0), (0, 1), (0, 1), (0, 1), (0, 1)), 0.25)
    assert flood.thumbs == pytest.approx(16 / 3)  # T = 4 / (1 - 0.25): the flooder counts T / 4 = 4/3
    assert flood.thumbs_up == pytest.approx(flood.thumbs / 4) and flood.thumbs_down == 4
    assert flood.thumbs_up / flood.thumbs <= 0.25 + 1e-9

    uncapped = capped_thumbs(votes((50, 0), (0, 1)), 1.0)
    assert (uncapped.thumbs_up, uncapped.thumbs_down) == (50, 1)


def thumbs(store, version: str, up: int, down: int, start: int, callers: int = 10) -> None:
    """``up`` + ``down`` answers of ``version``, each thumbed once, spread over ``callers`` end users."""
    for i in range(up + down):
        cid = f"cmpl-{version}-{start + i}"
        choice = ChoiceRecord(0, "a", (2,), "stop")
        store.append_completion(
            CompletionRecord(
                cid,
                0.0,
                "app",
                version,
                "completions",
                "p",
                None,
                (1,),
                {},
                (choice,),
                1,
                1,
                0.1,
                user=f"u{i % callers}",
            )
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
    rollouts = open_rollout_store(str(tmp_path / "data" / "events.db"), tmp_path / "data")
    made = RolloutController(rollouts, registry, store, slots, Router(slots, "heed"), metrics, rule, auto_canary=True)
    made.state = RolloutState(stable="base", canary="v2", canary_share=5, considered_sequence=2)
    yield made, store, registry, folder
    store.close()


def test_the_controller_holds_until_a_step_has_its_feedback_then_advances_a_better_canary(
    controller, tmp_path: Path
) -> None:
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
    assert load_state(tmp_path / "data") == made.state  # persisted with its evidence
    assert made.state.step_since_seq == store.last_seq()  # the next step counts its own feedback


def test_the_state_keeps_the_latest_decisions_and_the_servers_log_every_one(
    controller, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made, store, _, _ = controller
    firsts = (
        decision("initialised", "v0", "server", "the served base model", 0.0),
        decision("promoted", "v1", "controller", "won", 0.0),
        decision("promoted", "base", "controller", "won", 0.0),
        decision("canary_started", "v2", "controller", "published", 5.0),
    )
    old = firsts + tuple(
        decision("refused", f"r{i}", "controller", "not from stable", 0.0) for i in range(HISTORY_KEPT)
    )
    made.state = dataclasses.replace(made.state, history=old)
    assert made.state.in_use() == {"base", "v1", "v2"}
    thumbs(store, "base", 100, 100, 0)
    thumbs(store, "v2", 40, 10, 0)
    caplog.set_level("INFO", logger="serving.controller")
    asyncio.run(made.judge())

    kept = load_state(tmp_path / "data").history
    # The latest HISTORY_KEPT, and before them what says the previous stable and the canary's start.
    assert kept[3:] == (*old[5:], kept[-1]) and kept[-1].action == "advanced"
    assert kept[:3] == firsts[1:] and load_state(tmp_path / "data").in_use() == {"base", "v1", "v2"}
    assert "rollout: advanced v2 by controller at 25%" in caplog.text


def test_a_version_trained_from_a_policy_that_is_no_longer_stable_is_not_canaried(controller) -> None:
    made, _, registry, folder = controller
    made.state = RolloutState(stable="v2", considered_sequence=2)  # v2 was promoted meanwhile
    stale = registry.publish(folder, parent="base")  # v3, trained from base

    asyncio.run(made.take_up_new_version())

    refused = made.state.history[-1]
    assert (refused.action, refused.version) == ("refused", stale.version)
    assert "trained from base, but v2 is stable" in refused.reason
    assert made.state.canary is None and made.state.considered_sequence == stale.sequence


def one_callers_thumbs(store, version: str, completions: int, thumbs_each: int, user: str = "mallory") -> None:
    """One caller's ``completions`` answers of ``version``, each thumbed up ``thumbs_each`` times."""
    for i in range(completions):
        cid = f"cmpl-{user}-{version}-{i}"
        choice = ChoiceRecord(0, "a", (2,), "stop")
        store.append_completion(
            CompletionRecord(
                cid, 0.0, "app", version, "completions", "p", None, (1,), {}, (choice,), 1, 1, 0.1, user=user
            )
        )
        for j in range(thumbs_each):
            store.append_feedback(
                FeedbackRecord(f"fb-{cid}-{j}", cid, 0.0, "app", "thumb", thumb=1, policy_version=version)
            )


def test_one_caller_cannot_move_a_canary_with_repeated_or_many_thumbs(controller) -> None:
    made, store, _, _ = controller
    made.rule = RolloutRule(steps=(5, 25, 50, 100), min_feedback_per_step=20, advance_probability=0.95)
    thumbs(store, "base", 100, 100, 0)  # stable: 50% up, from ten callers

    one_callers_thumbs(store, "v2", 1, 50)  # the finding: one completion, fifty thumbs
    asyncio.run(made.judge())
    assert made.evidence["canary"]["votes"] == 1 and made.state.history == ()

    one_callers_thumbs(store, "v2", 60, 1, user="mallory2")  # sixty answers, one caller
    asyncio.run(made.judge())
    assert made.evidence["canary"]["callers"] == 2 and made.evidence["canary_thumbs_this_step"] == 0
    assert made.state.history == ()

    thumbs(store, "v2", 16, 24, 1000)  # honest users like v2 less than stable (40% up)
    asyncio.run(made.judge())
    canary = made.evidence["canary"]
    assert canary["votes"] == 101 and canary["callers"] == 12
    assert canary["thumbs_up_rate"] < 0.6  # uncapped it would be (16 + 61) / 101 = 76%
    assert made.state.step == 0 and [d.action for d in made.state.history] != ["advanced"]


def test_a_caller_who_changes_a_thumb_has_one_vote_the_latest(log_url: str) -> None:
    store = open_store(log_url)  # either backend
    choice = ChoiceRecord(0, "a", (2,), "stop")
    store.append_completion(
        CompletionRecord("c1", 0.0, "app", "v2", "completions", "p", None, (1,), {}, (choice,), 1, 1, 0.1, user="ann")
    )
    for i, thumb in enumerate((1, 1, -1)):
        store.append_feedback(
            FeedbackRecord(f"f{i}", "c1", 0.0, "app", "thumb", choice_index=0, thumb=thumb, policy_version="v2")
        )
    assert store.thumb_votes() == [CallerThumbs("v2", "app", "ann", 0, 1)]
    assert store.thumb_votes(after=store.last_seq()) == []
    store.close()


def test_the_users_a_key_may_not_name_count_as_its_principal_in_either_log(log_url: str) -> None:
    """A completion logged with ``caller`` (its key may not name end users) counts under it, its
    ``user`` kept; older records without it still count under their ``user``. A key's requests
    that name no user, or an empty one, count under the key too: one caller, not three (each
    vote's caller is the completion's ``evidence_caller``, as the trainer counts it)."""
    store = open_store(log_url)  # either backend
    choice = ChoiceRecord(0, "a", (2,), "stop")
    callers = (
        [("rogue", f"made-up-{i}", "rogue") for i in range(5)]
        + [("rogue", None, None), ("rogue", "", None)]  # no user, an empty one: the server logs no caller
        + [("app", "ann", None), ("app", None, None), ("app", "", None)]
    )
    records = []
    for i, (principal, user, caller) in enumerate(callers):
        cid = f"c{i}"
        record = CompletionRecord(cid, 0.0, principal, "v2", "completions", "p", None, (1,), {}, (choice,), 1, 1, 0.1)
        records.append(dataclasses.replace(record, user=user, caller=caller))
        store.append_completion(records[-1])
        store.append_feedback(
            FeedbackRecord(f"f{i}", cid, 0.0, principal, "thumb", choice_index=0, thumb=1, policy_version="v2")
        )
    assert sorted(store.thumb_votes(), key=lambda v: (v.principal, v.user)) == [
        CallerThumbs("v2", "app", "ann", 1, 0),
        CallerThumbs("v2", "app", "app", 2, 0),
        CallerThumbs("v2", "rogue", "rogue", 7, 0),
    ]
    assert {(v.principal, v.user) for v in store.thumb_votes()} == {(r.principal, r.evidence_caller) for r in records}
    logged = store.get_completion("c0")
    assert (logged.user, logged.caller) == ("made-up-0", "rogue")
    store.close()


def test_a_canary_whose_files_are_gone_fails_its_promotion_and_pauses_the_rollout(controller) -> None:
    made, _, registry, _ = controller
    shutil.rmtree(registry.root / "v2")  # deleted by hand, or pruned under an admin's canary

    with pytest.raises(Conflict, match="promoting v2 failed"):
        asyncio.run(made.act("promote", "ops"))

    last = made.state.history[-1]
    assert (last.action, last.version, made.state.paused) == ("promote_failed", "v2", True)
    assert (made.state.stable, made.state.canary) == ("base", "v2")  # nothing else moved


def test_a_swap_is_checked_against_the_config_the_engine_started_on(tmp_path: Path) -> None:
    from serving.engine import SwapRefused, check_compatible

    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": 100}))
    check_compatible({"hidden_size": 64, "vocab_size": 100}, new)  # its folder may be gone since
    with pytest.raises(SwapRefused, match="hidden_size"):
        check_compatible({"hidden_size": 32, "vocab_size": 100}, new)


def test_versions_the_rollout_no_longer_serves_take_their_metric_series_with_them(controller) -> None:
    made, _, _, _ = controller  # stable base, canary v2
    m = made.metrics
    for version in ("v0", "base", "v2"):  # v0: a version served long ago
        m.requests.labels("http", "/v1/completions", "200", version).inc()
        m.request_duration.labels("http", "/v1/completions", "200", version).observe(0.3)
        m.engine_ttft.labels("canary", version).observe(0.1)
        m.record_thumb(version, 1)
    before = m.exposition().decode()
    assert 'policy_version="v0"' in before

    asyncio.run(made.act("pause", "ops"))  # any decision: the served versions are base and v2

    after = m.exposition().decode()
    assert 'policy_version="v0"' not in after
    for version in ("base", "v2"):
        assert (
            f'heed_requests_total{{api="http",endpoint="/v1/completions",policy_version="{version}",status="200"}} 1.0'
            in after
        )
        assert f'heed_thumbs_up_ratio{{policy_version="{version}"}} 1.0' in after
    m.record_thumb("v0", -1)  # a late thumb on an old answer: counted on from where it was
    assert 'heed_thumbs_up_ratio{policy_version="v0"} 0.5' in m.exposition().decode()
