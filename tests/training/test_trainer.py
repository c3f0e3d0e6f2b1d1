"""`heed trainer`: new feedback in the event log becomes a new published policy version, behind a
gate, with held-out callers kept out of training, and a SIGKILL at any point neither loses nor
double-counts anything."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

from heed.datadir import DataDir
from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, held_out, open_store
from heed.models import prepared_tokenizer
from heed.prompts import encode_chat
from heed.registry import PolicyRegistry
from heed.rollout import RolloutState, save_state
from heed.trainer_files import TrainerState
from tests.training.test_exporter import scrape
from tests.word_lists import PROMPTS, TARGET, WORDS, train_word_list_policy
from training import runtime
from training.builders import build_from_event_log
from training.config import TrainerConfig, trainer_flags
from training.round import build_round_data
from training.trainer import run_trainer

pytestmark = pytest.mark.slow  # trains a policy and runs trainer rounds

USERS = [f"user-{i}" for i in range(20)]
HELD_OUT = {u for u in USERS if held_out(u, 0.2)}


@functools.cache
def tokenizer() -> Any:
    """The tiny model's tokenizer: the default model's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepared_tokenizer()))


def served_ids(prompt: str) -> tuple[int, ...]:
    """The ids the server serves a one-turn chat as."""
    return tuple(encode_chat(tokenizer(), [user_turn(prompt)]))


def user_turn(prompt: str) -> dict[str, str]:
    return {"role": "user", "content": prompt}


def fill_log(data_dir: Path, n: int, seed: int, unique_prompts: bool = False) -> dict[str, str]:
    """``n`` chat completions for USERS (one sampled word list each, logged with the ids they were
    served as) and a thumb on each: up when the answer has at least two TARGET words. Returns each
    answer's user. ``unique_prompts``: every prompt asked once (as an app's users ask), so no two
    thumbs make a pair."""
    rng = random.Random(seed)
    store = open_store(DataDir(data_dir).events)
    users: dict[str, str] = {}
    for i in range(n):
        user, text = USERS[i % len(USERS)], " ".join(rng.choices(WORDS, k=6))
        users[text] = user
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        if unique_prompts:
            prompt = f"{prompt} ({seed}-{i})"
        completion = CompletionRecord(
            completion_id=f"cmpl-{seed}-{i}",
            created=1000.0 + i,
            principal="app",
            policy_version="base",
            endpoint="chat.completions",
            prompt=None,
            messages=(user_turn(prompt),),
            prompt_token_ids=served_ids(prompt),
            params={"temperature": 1.0},
            choices=(ChoiceRecord(0, text, (5, 6), "stop"),),
            prompt_tokens=len(served_ids(prompt)),
            completion_tokens=6,
            latency_s=0.1,
            user=user,
        )
        store.append_completion(completion)
        thumb = 1 if sum(w in TARGET for w in text.split()) >= 2 else -1
        store.append_feedback(
            FeedbackRecord(f"fb-{seed}-{i}", completion.completion_id, 2000.0 + i, "app", "thumb", thumb=thumb)
        )
    store.close()
    return users


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """A data directory with a stable version "base" (the tiny model taught to answer with word
    lists) and a log of 80 thumbed completions from 20 users."""
    root = tmp_path_factory.mktemp("trainer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sft = train_word_list_policy(tiny_model, root, demonstrations=128, steps=20)
    torch.set_num_threads(threads)
    data_dir = root / "data"
    PolicyRegistry(data_dir / "registry").import_base(sft, "base")
    save_state(data_dir, RolloutState(stable="base"))
    users = fill_log(data_dir, 80, seed=1)
    return {"data_dir": data_dir, "users": users}


@pytest.fixture
def data_dir(template: dict, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the template; the trainer's torch thread setting is undone afterwards."""
    threads = torch.get_num_threads()
    yield Path(shutil.copytree(template["data_dir"], tmp_path / "data"))
    torch.set_num_threads(threads)


def config(data_dir: Path, **overrides) -> TrainerConfig:
    """Small and fast, with a gate every candidate passes unless a test tightens it."""
    default = TrainerConfig()
    cfg = TrainerConfig(
        data_dir=data_dir,
        once=True,
        min_new_feedback=16,
        # lr 1e-3 was seen to blow up a warm-started tiny reward model in a few steps
        rm=dataclasses.replace(default.rm, lr=3e-4, batch_size=8, max_length=64),
        ppo=dataclasses.replace(
            default.ppo, iterations=3, episodes=8, minibatch_size=8, lr=1e-3, value_lr=1e-3, max_new_tokens=8
        ),
        rm_max_examples=48,
        heldout_max_examples=24,
        eval_prompts=8,
        rm_accuracy_margin=1.0,
        min_thumbs_auc=0.0,
        max_thumbs_ece=1.0,
        min_ratings_spearman=-1.0,
        min_win_rate=0.0,
        max_kl=1e9,
        take_up_wait_s=0,  # no server takes versions up here
        nice=0,
        threads=1,  # tiny matrices: one thread is steadier and faster than two on a busy 2-core host
    )
    return dataclasses.replace(cfg, **overrides)


def flags(cfg: TrainerConfig) -> list[str]:
    """The command-line flags that give ``cfg``."""
    out = []
    default = trainer_flags(TrainerConfig())
    for name, value in trainer_flags(cfg).items():
        if value != default[name]:
            flag = "--" + name.replace("_", "-")
            out += [flag] if value is True else [flag, str(value)]
    return out


def last_seq(data_dir: Path) -> int:
    store = open_store(data_dir / "events.db")
    try:
        return store.last_seq()
    finally:
        store.close()


def report(data_dir: Path, round_: int) -> dict:
    return json.loads((data_dir / "trainer" / "rounds" / f"round-{round_:04d}.json").read_text())


def versions(data_dir: Path) -> list[str]:
    return [m.version for m in PolicyRegistry(data_dir / "registry").versions()]


def heed_trainer(*argv: str) -> tuple[int, str]:
    """`heed trainer ...` in this process, through the parser register_trainer builds."""
    import argparse

    from training.cli import register_trainer

    parser = argparse.ArgumentParser(prog="heed")
    register_trainer(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trainer", *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        code = args.run(args)
    return code, out.getvalue()


# ---- the tests -----------------------------------------------------------------------------------


def test_below_the_threshold_nothing_is_trained(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(data_dir / "events.db")
    have = build_round_data(store, store.last_seq(), 0.2).feedback(config(data_dir))
    store.close()
    caplog.set_level("INFO")

    assert run_trainer(config(data_dir, min_new_feedback=have + 1)) == 0

    assert f"{have:g} new feedback since the last round" in caplog.text
    assert versions(data_dir) == ["base"]
    assert not (data_dir / "trainer" / "rounds").exists()
    assert TrainerState.load(data_dir / "trainer" / "state.json").watermark == 0


def test_no_round_starts_while_a_canary_is_being_judged(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_state(data_dir, RolloutState(stable="base", canary="v9", canary_share=5))
    caplog.set_level("INFO")

    assert run_trainer(config(data_dir)) == 0  # enough data, but the verdict on v9 comes first

    assert "canary v9 is being judged" in caplog.text
    assert versions(data_dir) == ["base"] and not (data_dir / "trainer" / "rounds").exists()
    save_state(data_dir, RolloutState(stable="base"))
    assert run_trainer(config(data_dir)) == 0
    assert versions(data_dir) == ["base", "v2"]


def test_the_next_round_waits_for_the_server_to_take_up_the_last_published_version(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Started between a publish and the controller's canary, a round would train from the old
    stable version, and the controller would refuse what it published."""
    assert run_trainer(config(data_dir)) == 0
    fill_log(data_dir, 40, seed=2)
    caplog.set_level("INFO")

    assert run_trainer(config(data_dir, take_up_wait_s=600)) == 0

    assert "v2 is published; the next round starts after the server takes it up" in caplog.text
    assert versions(data_dir) == ["base", "v2"]
    v2 = PolicyRegistry(data_dir / "registry").manifest("v2")
    save_state(data_dir, RolloutState(stable="base", considered_sequence=v2.sequence))  # e.g. refused
    assert run_trainer(config(data_dir, take_up_wait_s=600)) == 0
    assert versions(data_dir) == ["base", "v2", "v3"]


def test_a_round_publishes_a_version_trained_on_the_training_callers_only(data_dir: Path, template: dict) -> None:
    seq = last_seq(data_dir)

    # PPO gets a sample of the prompts and ptx texts, not all of them (a log of months holds many).
    assert run_trainer(config(data_dir, ppo_max_examples=3)) == 0

    assert versions(data_dir) == ["base", "v2"]
    registry = PolicyRegistry(data_dir / "registry")
    manifest = registry.manifest("v2")
    assert (manifest.parent, manifest.watermark, manifest.source) == ("base", seq, "trainer")
    assert manifest.data["thumb_pairs"] > 0 and manifest.data["heldout_thumb_pairs"] > 0
    assert manifest.data["heldout_callers"] == len(HELD_OUT) and manifest.data["training_callers"] == 20 - len(HELD_OUT)
    assert {"rm_heldout_accuracy", "win_rate", "kl", "gate"} <= set(manifest.evaluation)
    assert 0 <= manifest.evaluation["win_rate"] <= 1
    from safetensors.torch import load_file

    new, old = (load_file(str(registry.verify(v) / "model.safetensors")) for v in ("v2", "base"))
    assert any(not torch.equal(new[k], old[k]) for k in new)

    done = report(data_dir, 1)
    assert done["decision"] == "published v2" and done["watermark"] == seq
    # 24 held-out thumbs: enough (gate_min_examples) for the thumbs' own checks.
    names = ["rm_heldout_accuracy", "rm_thumbs_auc", "rm_thumbs_ece", "win_rate", "kl", "entropy_ratio"]
    assert [c["name"] for c in done["gate"]] == names
    assert all(c["passed"] for c in done["gate"])
    assert set(done["stages"]) == {"data", "reward_model", "ppo", "evaluate"}
    assert (done["stages"]["data"]["ppo_prompts"], done["stages"]["data"]["ptx_texts"]) == (3, 3)
    assert manifest.data["prompts"] > 3
    assert all(s["seconds"] >= 0 and s["peak_rss_gib"] > 0 for s in done["stages"].values())
    assert done["memory"]["estimate_gib"]["total"] < done["memory"]["budget_gib"]
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert (state.watermark, state.round, state.versions, state.pending_watermark) == (seq, 1, ("v2",), None)
    assert (data_dir / "trainer" / state.reward_model / "reward_head.pt").exists()
    assert not (data_dir / "trainer" / "work").exists()

    code, out = heed_trainer("status", "--data-dir", str(data_dir))
    assert code == 0
    assert "round 1: published v2" in out and "gate: win_rate" in out and f"watermark:          {seq}" in out

    # The held-out callers' feedback is in the evaluation set and nowhere in the training set.
    store = open_store(data_dir / "events.db")
    train = build_from_event_log(store, callers=lambda c: not held_out(c, 0.2))
    heldout = build_from_event_log(store, callers=lambda c: held_out(c, 0.2))
    store.close()
    answer_users = template["users"]
    assert HELD_OUT and all(answer_users[a] not in HELD_OUT for c in train.pairs for a in c.responses)
    assert all(answer_users[a] in HELD_OUT for c in heldout.pairs for a in c.responses)
    assert (len(train.pairs), len(heldout.pairs)) == (
        manifest.data["thumb_pairs"],
        manifest.data["heldout_thumb_pairs"],
    )


def test_thumbs_on_prompts_asked_once_start_a_round_and_train_the_reward_model(tmp_path: Path, template: dict) -> None:
    """An app's users each ask their own question and press one thumb: no two thumbs share a
    prompt, so no pair exists. The thumbs alone reach the threshold, train the reward model
    (pointwise) and are judged per kind on the held-out callers."""
    data_dir = tmp_path / "data"
    registry = PolicyRegistry(template["data_dir"] / "registry")
    PolicyRegistry(data_dir / "registry").import_base(registry.verify("base"), "base")
    save_state(data_dir, RolloutState(stable="base"))
    fill_log(data_dir, 160, seed=3, unique_prompts=True)
    cfg = config(data_dir, min_new_feedback=60, gate_min_examples=8)

    assert run_trainer(cfg) == 0

    done = report(data_dir, 1)
    assert done["decision"] == "published v2", done["decision"]
    data = done["data"]
    assert data["thumb_pairs"] == data["heldout_thumb_pairs"] == data["rankings"] == 0
    assert data["thumbs"] + data["heldout_thumbs"] == 160 and data["feedback_total"] == 160 * cfg.thumb_signal
    heldout = done["stages"]["reward_model"]["heldout"]
    assert (
        heldout["comparisons"] == 0 and heldout["thumbs"] == min(data["heldout_thumbs"], cfg.heldout_max_examples) >= 8
    )
    assert heldout["thumbs_auc"] is not None and heldout["thumbs_ece"] is not None
    assert [c["name"] for c in done["gate"]] == ["rm_thumbs_auc", "rm_thumbs_ece", "win_rate", "kl", "entropy_ratio"]
    code, out = heed_trainer("status", "--data-dir", str(data_dir))
    assert code == 0 and f"thumbs AUC {heldout['thumbs_auc']:.3f}" in out


def test_a_reward_model_that_fails_its_checks_ends_the_round_before_ppo(data_dir: Path) -> None:
    """PPO against a reward model the gate rejects would be rejected too: the round stops after
    the reward model, reports why, and keeps no reward model."""
    assert run_trainer(config(data_dir, min_thumbs_auc=1.01)) == 0

    assert versions(data_dir) == ["base"]
    done = report(data_dir, 1)
    assert done["decision"].startswith("rejected: rm_thumbs_auc") and done["version"] is None
    assert set(done["stages"]) == {"data", "reward_model"}
    assert [c["name"] for c in done["gate"]] == ["rm_heldout_accuracy", "rm_thumbs_auc", "rm_thumbs_ece"]
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert (state.round, state.reward_model, state.versions) == (1, None, ())


def test_a_failed_gate_publishes_nothing_but_reports_and_advances_the_watermark(data_dir: Path) -> None:
    seq = last_seq(data_dir)

    assert run_trainer(config(data_dir, min_win_rate=1.01)) == 0

    assert versions(data_dir) == ["base"]
    done = report(data_dir, 1)
    assert done["decision"].startswith("rejected: win_rate") and done["version"] is None
    failed = [c for c in done["gate"] if not c["passed"]]
    assert [(c["name"], c["threshold"]) for c in failed] == [("win_rate", 1.01)]
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert (state.watermark, state.round, state.versions) == (seq, 1, ())
    # The reward model passed its own check, so the next round starts from it.
    assert state.reward_model == "rm/round-0001"


def test_a_trainer_that_lost_the_logs_lock_during_a_round_publishes_nothing(data_dir: Path) -> None:
    """A round takes minutes; if the event log's trainer lock went meanwhile (its PostgreSQL
    connection dropped, another trainer took it), the round ends without publishing, and its
    watermark stays pending: the feedback is not trained twice into two versions."""
    from heed.trainer_files import TrainerFiles
    from training.trainer import LostLease, poll_once

    cfg, files = config(data_dir), TrainerFiles.of(data_dir)
    store = open_store(DataDir(data_dir).events)
    try:
        with pytest.raises(LostLease, match="during round 1"):
            poll_once(
                cfg, files, PolicyRegistry(data_dir / "registry"), store, RolloutState(stable="base"),
                TrainerState(), threading.Event(), still_mine=lambda: False,
            )  # fmt: skip
    finally:
        store.close()
    assert versions(data_dir) == ["base"]
    state = TrainerState.load(files.state)
    assert (state.round, state.versions, state.pending_watermark) == (0, (), last_seq(data_dir))


def test_the_next_round_starts_from_the_last_reward_model_and_is_judged_against_it(data_dir: Path) -> None:
    assert run_trainer(config(data_dir)) == 0
    first = TrainerState.load(data_dir / "trainer" / "state.json")
    fill_log(data_dir, 40, seed=2)
    seq = last_seq(data_dir)

    assert run_trainer(config(data_dir)) == 0

    done = report(data_dir, 2)
    rm = done["stages"]["reward_model"]
    assert rm["start"] == f"warm start from {data_dir / 'trainer' / 'rm' / 'round-0001'}"
    assert rm["previous_heldout"]["comparisons"] == rm["heldout"]["comparisons"] > 0
    check = done["gate"][0]
    assert check["rule"] == ">= the previous RM's - margin"
    assert check["threshold"] == pytest.approx(rm["previous_heldout"]["accuracy"] - 1.0)
    assert (done["previous_watermark"], done["watermark"]) == (first.watermark, seq)
    assert done["data"]["feedback_total"] > first.feedback
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert state.versions == ("v2", "v3") and state.reward_model == "rm/round-0002"
    assert not (data_dir / "trainer" / "rm" / "round-0001").exists()  # replaced by round 2's
    assert PolicyRegistry(data_dir / "registry").manifest("v3").parent == "base"  # stable is still base


def test_a_new_reward_model_worse_than_the_last_leaves_ppo_to_the_last_one(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a round's new reward model fails its checks but the previous one still passes a first
    one's floors on the round's held-out data, PPO, the win rate and the gate use the previous one
    (unless --no-rm-fallback), and the previous one stays the one the next round builds on. Which
    reward model is better is not what this is about: the new one's checks are failed here."""
    import training.ppo
    import training.round
    from training.evaluate import rm_checks

    def new_one_fails(heldout, previous, floors):  # type: ignore[no-untyped-def]
        checks = rm_checks(heldout, previous, floors)
        return [dataclasses.replace(c, passed=False) for c in checks] if previous is not None else checks

    judges: dict[str, list[Path]] = {"ppo": [], "win_rate": []}

    def recording(name, stage):  # type: ignore[no-untyped-def]
        def call(cfg_or_policy, *args, **kwargs):  # type: ignore[no-untyped-def]
            judges[name].append(Path(cfg_or_policy.reward_model if name == "ppo" else args[1]))
            return stage(cfg_or_policy, *args, **kwargs)

        return call

    assert run_trainer(config(data_dir)) == 0
    monkeypatch.setattr(training.round, "rm_checks", new_one_fails)
    monkeypatch.setattr(training.ppo, "train_ppo", recording("ppo", training.ppo.train_ppo))
    monkeypatch.setattr(training.round, "win_rate", recording("win_rate", training.round.win_rate))
    for seed, overrides in ((2, {"rm_fallback": False}), (3, {}), (4, {"min_rm_accuracy": 1.01})):
        fill_log(data_dir, 40, seed=seed)
        assert run_trainer(config(data_dir, **overrides)) == 0

    off, on, declined = report(data_dir, 2), report(data_dir, 3), report(data_dir, 4)
    for rejected in (off, declined):  # no fallback asked for; the previous one under the floor
        assert rejected["decision"].startswith("rejected: rm_heldout_accuracy"), rejected["decision"]
        assert set(rejected["stages"]) == {"data", "reward_model"}
    first = data_dir / "trainer" / "rm" / "round-0001"
    assert judges == {"ppo": [first], "win_rate": [first]}  # round 3's only
    assert off["reward_model"] == on["reward_model"] == declined["reward_model"] == "rm/round-0001"
    assert on["stages"]["reward_model"]["fallback"] == str(first)
    assert on["decision"].startswith("published v3 (judged by the previous reward model, rm/round-0001: this round's")
    assert not any(c["passed"] for c in on["stages"]["reward_model"]["checks"])  # the new one's
    # Gated as a first reward model would be, on this round's held-out data: its score there.
    check = on["gate"][0]
    assert (check["name"], check["rule"], check["passed"]) == ("rm_heldout_accuracy", ">= chance - margin", True)
    assert check["value"] == on["stages"]["reward_model"]["previous_heldout"]["accuracy"]
    evaluation = PolicyRegistry(data_dir / "registry").manifest("v3").evaluation
    assert evaluation["judge"] == "the previous reward model (round-0001)"
    assert not any(c["passed"] for c in evaluation["rm_gate"])  # the new one's checks, kept for the record
    assert evaluation["rm_heldout_accuracy"] == check["value"]  # the judge's, not the new one's
    assert evaluation["rm_heldout"] == on["stages"]["reward_model"]["previous_heldout"]
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert state.reward_model == "rm/round-0001" and first.is_dir()
    assert state.versions == ("v2", "v3")


def test_in_adapter_mode_rounds_publish_a_chain_of_adapters_on_the_base(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server in adapter mode (its rollout state says so): round 1 trains a LoRA adapter on the
    stable base and publishes the adapter alone; once it is stable, round 2 trains that adapter on
    (same rank, its KL reference the merged stable model) and publishes an adapter on the same base."""
    save_state(data_dir, RolloutState(stable="base", mode="adapter"))
    assert run_trainer(config(data_dir, adapter_rank=4)) == 0

    registry = PolicyRegistry(data_dir / "registry")
    v2 = registry.manifest("v2")
    assert (v2.mode, v2.base, v2.parent, v2.adapter["r"]) == ("adapter", "base", "base", 4)
    assert set(v2.files) == {"adapter_config.json", "adapter_model.safetensors"}
    first = report(data_dir, 1)
    assert first["mode"] == "adapter" and first["decision"] == "published v2"
    full = runtime.ppo_memory_gib(registry.verify("base"))
    assert first["memory"]["estimate_gib"]["policy"] < full["policy"] / 3  # the body frozen: weights only
    assert first["stages"]["ppo"]["adapter_from"] == "a new adapter"

    save_state(data_dir, RolloutState(stable="v2", mode="adapter", considered_sequence=v2.sequence))
    fill_log(data_dir, 40, seed=2)
    assert run_trainer(config(data_dir, adapter_rank=8)) == 0  # the chain keeps its rank, not the setting

    v3 = registry.manifest("v3")
    assert (v3.mode, v3.base, v3.parent, v3.adapter["r"]) == ("adapter", "base", "v2", 4)
    second = report(data_dir, 2)
    assert second["decision"] == "published v3"
    assert second["stages"]["ppo"]["adapter_from"].endswith("registry/v2")
    assert second["gate"][-3]["name"] == "win_rate" and second["stages"]["evaluate"]["prompts"] > 0
    assert registry.manifest("v3").evaluation["win_rate_against"] == "v2"
    assert registry.verify("v3") and not (data_dir / "trainer" / "work").exists()

    # A full-mode server with an adapter stable: the trainer waits, with the reason.
    save_state(data_dir, RolloutState(stable="v3", considered_sequence=v3.sequence))
    fill_log(data_dir, 40, seed=3)
    caplog.set_level("INFO", logger="training.trainer")
    assert run_trainer(config(data_dir)) == 0
    assert versions(data_dir) == ["base", "v2", "v3"]
    assert "the stable version v3 is an adapter and the server serves full versions" in caplog.text


def test_a_round_over_the_memory_budget_is_skipped_with_a_report(data_dir: Path) -> None:
    assert run_trainer(config(data_dir, memory_budget_gib=0.01)) == 1

    done = report(data_dir, 1)
    assert done["decision"].startswith("skipped: the estimated memory")
    assert done["memory"]["estimate_gib"]["policy"] > 0
    assert versions(data_dir) == ["base"]
    assert TrainerState.load(data_dir / "trainer" / "state.json").watermark == 0


def test_a_version_published_before_a_crash_is_adopted_not_published_twice(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seq = last_seq(data_dir)
    save = TrainerState.save

    def crash_when_the_round_is_recorded(self: TrainerState, path: Path) -> None:
        if self.round == 1:
            raise KeyboardInterrupt  # killed after publishing, before the state write
        save(self, path)

    monkeypatch.setattr(TrainerState, "save", crash_when_the_round_is_recorded)
    with pytest.raises(KeyboardInterrupt):
        run_trainer(config(data_dir))
    monkeypatch.setattr(TrainerState, "save", save)
    assert versions(data_dir) == ["base", "v2"]
    assert TrainerState.load(data_dir / "trainer" / "state.json").watermark == 0

    assert run_trainer(config(data_dir)) == 0  # adopts v2; no new comparisons since

    assert versions(data_dir) == ["base", "v2"]
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert (state.watermark, state.round, state.versions, state.reward_model) == (seq, 1, ("v2",), "rm/round-0001")


def test_a_trainer_killed_mid_round_publishes_nothing_and_a_restart_completes_the_round(data_dir: Path) -> None:
    seq = last_seq(data_dir)
    cfg = config(data_dir, nice=5)
    log_path = data_dir.parent / "trainer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "trainer", *flags(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while "PPO-ptx from" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, log_path.read_text()[-3000:]
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert versions(data_dir) == ["base"]
    state = TrainerState.load(data_dir / "trainer" / "state.json")
    assert (state.watermark, state.round, state.pending_watermark) == (0, 0, seq)
    assert (data_dir / "trainer" / "work").exists()  # what the killed round left

    assert run_trainer(config(data_dir)) == 0

    assert versions(data_dir) == ["base", "v2"]
    assert PolicyRegistry(data_dir / "registry").manifest("v2").watermark == seq
    assert not (data_dir / "trainer" / "work").exists()
    assert not [p for p in (data_dir / "registry").iterdir() if p.name.startswith(".")]
    assert run_trainer(config(data_dir)) == 0  # nothing new: no second version
    assert versions(data_dir) == ["base", "v2"]


def test_sigterm_stops_a_waiting_trainer_cleanly_and_its_metrics_told_what_it_waited_for(data_dir: Path) -> None:
    with socket.socket() as probe:  # a free port for the trainer's /metrics
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = config(data_dir, once=False, poll_s=0.2, min_new_feedback=10**6, metrics_port=port)
    log_path = data_dir.parent / "trainer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "trainer", *flags(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while "a round needs" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        said = re.search(r"([0-9.]+) new feedback since the last round", log_path.read_text())
        assert said, log_path.read_text()[-3000:]
        samples = scrape(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert log_path.read_text().rstrip().endswith("stopped")
    assert samples[("heed_trainer_feedback_pending", ())] == float(said.group(1)) > 0
    assert samples[("heed_trainer_feedback_needed", ())] == 10**6
    assert samples[("heed_trainer_rounds_total", (("decision", "published"),))] == 0
    assert samples[("heed_trainer_round_running", ())] == 0
    assert samples[("heed_trainer_torch_threads", ())] == cfg.threads == 1  # as set, not followed
