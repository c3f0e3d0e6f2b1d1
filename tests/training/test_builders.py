"""Training data built from a real event log: rankings, thumbs, corrections and prompts."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from pathlib import Path

import pytest

from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, LogFollower, open_store
from heed.prompts import ServedPrompt
from heed.registry import PolicyRegistry
from heed.rollout import RolloutState
from heed.trainer_files import TrainerFiles, TrainerState
from training.builders import build_from_event_log, export, fair_limit, parse_score_keys
from training.config import TrainerConfig
from training.data import (
    Comparison,
    Demonstration,
    Judged,
    Rated,
    read_comparisons,
    read_demonstrations,
    read_prompts,
    read_ratings,
)
from training.round import build_round_data
from training.trainer import poll_once

_ids = itertools.count()


def served_ids(prompt: str | None, messages=None) -> tuple[int, ...]:
    """Stand-in served ids: one per byte of the prompt, different for a raw text and a chat."""
    return tuple(json.dumps([prompt, messages]).encode())


def served(prompt: str | None, messages=None) -> ServedPrompt:
    """The prompt the builders make of a completion logged by ``completion``."""
    return ServedPrompt(prompt, messages, served_ids(prompt, messages))


def completion(prompt: str | None, answers: list[str], messages=None, ids=None) -> CompletionRecord:
    n = next(_ids)
    ids = ids or served_ids(prompt, messages)
    return CompletionRecord(
        completion_id=f"cmpl-{n}",
        created=1000.0 + n,
        principal="app",
        policy_version="v1",
        endpoint="chat.completions" if messages else "completions",
        prompt=prompt,
        messages=messages,
        prompt_token_ids=ids,
        params={"temperature": 1.0},
        choices=tuple(ChoiceRecord(i, text, (5, 6), "stop") for i, text in enumerate(answers)),
        prompt_tokens=len(ids),
        completion_tokens=2 * len(answers),
        latency_s=0.1,
    )


def feedback(c: CompletionRecord, kind: str, principal: str = "alice", **fields) -> FeedbackRecord:
    n = next(_ids)
    return FeedbackRecord(
        feedback_id=f"fb-{n}",
        completion_id=c.completion_id,
        created=2000.0 + n,
        principal=principal,
        kind=kind,
        policy_version="v1",
        **fields,
    )


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(tmp_path / "events.db")
    yield s
    s.close()


def test_rankings_thumbs_corrections_and_prompts_become_training_data(store, tmp_path: Path) -> None:
    ranked = completion("Name a colour.", ["red", "blue", "green", "teal"])
    store.append_completion(ranked)
    store.append_feedback(feedback(ranked, "ranking", ranking=(2, 0, 3, 1)))
    up = completion("Say hi.", ["Hi!"])
    down = completion("Say hi.", ["Go away."])
    chat = completion(None, ["4"], messages=({"role": "user", "content": "2+2?"},))
    for c in (up, down, chat):
        store.append_completion(c)
    store.append_feedback(feedback(up, "thumb", thumb=-1))
    store.append_feedback(feedback(up, "thumb", thumb=1))  # changed their mind: the last one counts
    store.append_feedback(feedback(down, "thumb", thumb=-1, choice_index=0))
    store.append_feedback(feedback(chat, "correction", correction="2 + 2 = 4."))
    store.append_feedback(feedback(chat, "rating", rating=6))

    data = build_from_event_log(store)

    chat_prompt = served(None, ({"role": "user", "content": "2+2?"},))
    assert data.comparisons == [Comparison(served("Name a colour."), ("green", "red", "teal", "blue"))]
    assert data.pairs == [Comparison(served("Say hi."), ("Hi!", "Go away."), kind="thumbs")]
    assert data.judged == [Judged(served("Say hi."), "Hi!", True), Judged(served("Say hi."), "Go away.", False)]
    assert data.demonstrations == [Demonstration(chat_prompt, "2 + 2 = 4.")]
    assert data.corrections == [Comparison(chat_prompt, ("2 + 2 = 4.", "4"), kind="correction")]
    assert data.ratings == [Rated(chat_prompt, "4", 6)]
    assert data.prompts == [served("Name a colour."), served("Say hi."), chat_prompt]
    assert data.watermark == store.last_seq()

    export(data, tmp_path / "data")
    assert read_comparisons(tmp_path / "data" / "comparisons.jsonl", strict=True) == data.ranked()
    assert read_ratings(tmp_path / "data" / "ratings.jsonl", strict=True) == data.ratings
    assert read_demonstrations(tmp_path / "data" / "demonstrations.jsonl", strict=True) == data.demonstrations
    assert read_prompts(tmp_path / "data" / "prompts.jsonl", strict=True) == data.prompts


def test_named_scores_become_thumbs_and_ratings_where_their_key_is_mapped_and_the_rest_are_counted(store) -> None:
    answers = {name: completion(f"{name}?", [f"{name}!"]) for name in ("yes", "no", "high", "low", "five", "odd")}
    for c in answers.values():
        store.append_completion(c)

    def score(name: str, key: str, value, data_type: str, **fields) -> None:
        number = None if data_type == "CATEGORICAL" else float(value)
        category = value if data_type == "CATEGORICAL" else None
        store.append_feedback(
            feedback(answers[name], "score", key=key, data_type=data_type, score=number, category=category, **fields)
        )

    score("yes", "thumbs_up", True, "BOOLEAN")
    score("no", "thumbs_up", False, "BOOLEAN")
    score("high", "helpfulness", 0.8, "NUMERIC")
    store.append_feedback(feedback(answers["low"], "thumb", thumb=1))
    score("low", "helpfulness", 0.2, "NUMERIC")  # the same caller and choice: the latest vote counts
    score("five", "stars", 5, "NUMERIC")
    score("odd", "stars", 2.5, "NUMERIC")  # not a whole number from 1 to 7: not a rating
    score("odd", "tone", "friendly", "CATEGORICAL")  # no key maps it: kept, not used
    score("odd", "helpfulness", "great", "CATEGORICAL")  # a mapped key, but no number

    data = build_from_event_log(
        store, score_keys=parse_score_keys(["thumbs_up=thumb", "helpfulness=thumb", "stars=rating"])
    )

    assert {(j.response, j.desirable) for j in data.judged} == {
        ("yes!", True), ("no!", False), ("high!", True), ("low!", False)
    }  # fmt: skip
    assert [(r.response, r.rating) for r in data.ratings] == [("five!", 5)]
    assert data.scores == {"thumbs_up": 2, "helpfulness": 3, "stars": 2, "tone": 1}
    assert data.unused_scores == {"stars": 1, "tone": 1, "helpfulness": 1}
    assert data.counts()["scores"] == 8 and data.counts()["scores_unused"] == 3
    unmapped = build_from_event_log(store, score_keys={})
    assert [j.response for j in unmapped.judged] == ["low!"] and sum(unmapped.unused_scores.values()) == 8
    with pytest.raises(ValueError, match="key=thumb or key=rating"):
        parse_score_keys(["helpfulness=stars"])


def test_conversations_served_with_tools_are_skipped_with_their_feedback_and_counted(store) -> None:
    plain = completion("Weather?", ["Sunny."])
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    called = dataclasses.replace(completion("Weather?", ['{"city":"Paris"}']), params={"tools": tools})
    for c in (plain, called):
        store.append_completion(c)
        store.append_feedback(feedback(c, "thumb", thumb=1))

    data = build_from_event_log(store)

    assert [j.response for j in data.judged] == ["Sunny."]
    assert data.texts == ["Sunny."] and data.prompts == [served("Weather?")]
    assert data.counts()["skipped_tool_completions"] == 1 and data.counts()["skipped_tool_feedback"] == 1


def test_a_second_pass_reads_only_events_after_the_watermark(store) -> None:
    old = completion("Old prompt?", ["a", "b"])
    store.append_completion(old)
    first = build_from_event_log(store)
    new = completion("New prompt?", ["c", "d"])
    store.append_completion(new)
    store.append_feedback(feedback(old, "ranking", ranking=(1, 0)))  # on a completion before the mark

    second = build_from_event_log(store, first.watermark)

    assert second.prompts == [served("New prompt?")]
    assert second.comparisons == [Comparison(served("Old prompt?"), ("b", "a"))]


def test_heed_train_data_writes_the_jsonl_files_and_the_watermark(store, tmp_path: Path) -> None:
    import json

    from heed.cli import build_parser

    c = completion("Pick one.", ["this", "that"])
    store.append_completion(c)
    store.append_feedback(feedback(c, "ranking", ranking=(1, 0)))
    args = build_parser().parse_args(["train", "data", "--events", str(store.path), "--out", str(tmp_path / "d")])

    assert args.run(args) == 0
    assert read_comparisons(tmp_path / "d" / "comparisons.jsonl", strict=True) == [
        Comparison(served("Pick one."), ("that", "this"))
    ]
    assert json.loads((tmp_path / "d" / "watermark.json").read_text())["watermark"] == store.last_seq()


def test_a_caller_predicate_keeps_only_those_callers_records_up_to_a_log_position(store) -> None:
    """The caller is the completion's end user when the app named one, else whoever gave the
    feedback; ``until`` ignores what was logged after it."""
    named = [dataclasses.replace(completion("Pick a pet.", [a]), user=u) for a, u in (("cat", "ann"), ("dog", "bob"))]
    anonymous = completion("Pick a pet.", ["fish"])
    for c in (*named, anonymous):
        store.append_completion(c)
    store.append_feedback(feedback(named[0], "thumb", principal="app", thumb=1))  # ann's
    store.append_feedback(feedback(named[1], "thumb", principal="app", thumb=-1))  # bob's
    store.append_feedback(feedback(anonymous, "thumb", principal="carol", thumb=-1))  # carol's
    until = store.last_seq()
    late = completion("Late prompt?", ["x"])
    store.append_completion(late)

    ann_bob = build_from_event_log(store, until=until, callers=lambda c: c in ("ann", "bob"))
    ann_carol = build_from_event_log(store, until=until, callers=lambda c: c in ("ann", "carol"))
    everyone = build_from_event_log(store, until=until)

    assert ann_bob.pairs == [Comparison(served("Pick a pet."), ("cat", "dog"), kind="thumbs")]
    assert ann_carol.pairs == [Comparison(served("Pick a pet."), ("cat", "fish"), kind="thumbs")]
    assert ann_bob.texts == ["cat", "dog"]
    assert ann_carol.texts == ["cat"]  # an unnamed completion is its principal's ("app"), not carol's
    assert len(everyone.pairs) == 2 and everyone.watermark == until
    assert everyone.prompts == [served("Pick a pet.")]  # the late prompt is after `until`


def test_prompts_are_the_same_prompt_when_they_were_served_as_the_same_ids(store) -> None:
    """Dedupe and thumbs pairs go by the served ids: the same text sent raw and as a chat was two
    inputs (no pair between them), and a prompt sent as token ids is a prompt too."""
    chat = ({"role": "user", "content": "Say hi."},)
    raw_up, raw_down = completion("Say hi.", ["Hi!"]), completion("Say hi.", ["No."])
    chat_down = completion(None, ["Bye."], messages=chat)
    as_ids = completion(None, ["Hm."], ids=(7, 8, 9))
    for c in (raw_up, raw_down, chat_down, as_ids):
        store.append_completion(c)
    store.append_feedback(feedback(raw_up, "thumb", thumb=1))
    store.append_feedback(feedback(raw_down, "thumb", thumb=-1))
    store.append_feedback(feedback(chat_down, "thumb", thumb=-1))
    store.append_feedback(feedback(as_ids, "correction", correction="Hello."))

    data = build_from_event_log(store)

    assert data.prompts == [served("Say hi."), served(None, chat), ServedPrompt(token_ids=(7, 8, 9))]
    assert data.pairs == [Comparison(served("Say hi."), ("Hi!", "No."), kind="thumbs")]
    assert data.demonstrations == [Demonstration(ServedPrompt(token_ids=(7, 8, 9)), "Hello.")]


def test_an_apps_unique_prompt_thumbs_ratings_and_corrections_all_become_reward_model_data(store) -> None:
    """Every prompt asked once, no ranking: each thumb, rating and correction is still an example
    for the reward model (no pair is needed), and answers of one prompt rated differently make a
    comparison."""
    thumbed = [completion(f"Question {i}?", [f"answer {i}"]) for i in range(3)]
    rated = completion("Rate me?", ["ok", "great", "bad"])
    fixed = completion("Fix me?", ["wrong"])
    for c in (*thumbed, rated, fixed):
        store.append_completion(c)
    for i, c in enumerate(thumbed):
        store.append_feedback(feedback(c, "thumb", principal=f"user-{i}", thumb=1 if i % 2 == 0 else -1))
    for choice, rating in ((0, 4), (1, 7), (2, 4)):
        store.append_feedback(feedback(rated, "rating", rating=rating, choice_index=choice))
    store.append_feedback(feedback(fixed, "correction", correction="right"))

    data = build_from_event_log(store)

    assert data.comparisons == [] and data.pairs == []
    assert data.judged == [Judged(served(f"Question {i}?"), f"answer {i}", i % 2 == 0) for i in range(3)]
    assert data.ratings == [Rated(served("Rate me?"), text, r) for text, r in (("ok", 4), ("great", 7), ("bad", 4))]
    assert data.rating_pairs == [Comparison(served("Rate me?"), ("great", "ok", "bad"), (0, 1, 1), kind="rating")]
    assert data.corrections == [Comparison(served("Fix me?"), ("right", "wrong"), kind="correction")]
    assert data.demonstrations == [Demonstration(served("Fix me?"), "right")]
    assert len(data.reward_examples()) == 3 + 3 + 1 + 1  # thumbs, ratings, the rating pair, the correction


def test_one_vote_per_caller_completion_and_choice_counts_and_each_caller_is_capped(store) -> None:
    """A caller's repeated thumbs on one answer are one vote (the latest); one caller's flood of
    feedback on many answers gives at most ``max_per_caller`` examples of each kind (their latest)."""
    answers = [completion(f"Flood {i}?", [f"text {i}"]) for i in range(10)]
    honest = completion("Honest?", ["fine"])
    for c in (*answers, honest):
        store.append_completion(c)
    for _ in range(20):
        store.append_feedback(feedback(answers[0], "thumb", principal="mallory", thumb=1))
    store.append_feedback(feedback(answers[0], "thumb", principal="mallory", thumb=-1))  # the last one counts
    for c in answers[1:]:
        store.append_feedback(feedback(c, "thumb", principal="mallory", thumb=1))
        store.append_feedback(feedback(c, "rating", principal="mallory", rating=7))
    store.append_feedback(feedback(honest, "thumb", principal="alice", thumb=-1))

    uncapped = build_from_event_log(store)
    capped = build_from_event_log(store, max_per_caller=3)

    assert len(uncapped.judged) == 11  # mallory's 10 answers (one vote each) and alice's
    assert uncapped.judged[0] == Judged(served("Flood 0?"), "text 0", False)
    assert [j.response for j in capped.judged] == ["text 7", "text 8", "text 9", "fine"]
    assert [r.response for r in capped.ratings] == ["text 7", "text 8", "text 9"]


def test_no_caller_fills_the_prompt_pool_or_the_logged_answers(store) -> None:
    """PPO's prompts, the gate's win-rate prompts and the ptx fallback's answers come from every
    caller's completions: each caller gives at most ``max_per_caller`` of them (their latest), so
    one caller who asks many distinct questions does not choose what a round is judged on."""
    for i in range(30):
        store.append_completion(dataclasses.replace(completion(f"Flood {i}?", [f"flood {i}"]), user="mallory"))
    for user in ("ann", "bob", "cy"):
        for i in range(2):
            store.append_completion(dataclasses.replace(completion(f"{user} {i}?", [f"{user} says {i}"]), user=user))
    store.append_completion(dataclasses.replace(completion("Flood 29?", ["again"]), user="ann"))  # asked twice

    uncapped = build_from_event_log(store)
    capped = build_from_event_log(store, max_per_caller=3)

    assert len(uncapped.prompts) == 36 and len(uncapped.texts) == 37
    assert [p.text for p in capped.prompts] == [
        "Flood 27?", "Flood 28?", "Flood 29?", "ann 0?", "ann 1?", "bob 0?", "bob 1?", "cy 0?", "cy 1?"
    ]  # fmt: skip
    assert capped.texts[:3] == ["flood 27", "flood 28", "flood 29"] and "again" in capped.texts
    assert len(capped.texts) == 10


def test_no_caller_gives_more_than_its_share_of_any_kind_of_a_rounds_data(store, tmp_path: Path) -> None:
    """With ``max_caller_share``, a flooding caller keeps only their latest share of each kind
    (thumbs, corrections, prompts): 100 thumbs among seven callers' 5 each keep 11 (24% of 46).
    Fewer than 1 / share callers cannot be shared out: then only the per-caller cap holds."""

    def give(user: str, n: int) -> None:
        for _ in range(n):
            c = dataclasses.replace(completion(f"Question {next(_ids)}?", [f"answer {next(_ids)}"]), user=user)
            store.append_completion(c)
            store.append_feedback(feedback(c, "thumb", principal="app", thumb=1))
            store.append_feedback(feedback(c, "correction", principal="app", correction=f"better {next(_ids)}"))

    give("mallory", 100)
    give("ann", 5)
    assert fair_limit([100, 5], 0.25) is None
    two = build_from_event_log(store, max_per_caller=50, max_caller_share=0.25)
    assert len(two.judged) == len(two.demonstrations) == len(two.prompts) == 55  # the per-caller cap only

    for user in ("bob", "cy", "di", "ed", "flo", "gus"):
        give(user, 5)
    assert fair_limit([100] + [5] * 7, 0.25) == 11 and fair_limit([100, 5], 1.0) is None
    data = build_from_event_log(store, max_per_caller=200, max_caller_share=0.25)
    assert len(data.judged) == len(data.demonstrations) == len(data.prompts) == len(data.texts) == 46
    assert data.sent[("thumbs", "mallory")] == 11 and data.sent[("thumbs", "ann")] == 5
    whole = build_from_event_log(store, max_per_caller=200)
    assert len(whole.judged) == 135 and whole.sent[("thumbs", "mallory")] == 100  # the default: no share cap

    # `heed train data` holds callers to the trainer's caps too (200 each, a quarter of a kind).
    from heed.cli import build_parser

    def exported(*flags: str) -> int:
        out = tmp_path / f"d{len(flags)}"
        args = build_parser().parse_args(["train", "data", "--events", str(store.path), "--out", str(out), *flags])
        assert args.run(args) == 0
        return len((out / "judged.jsonl").read_text().splitlines())  # the thumbs

    assert exported() == 46 and exported("--max-caller-share", "1") == 135
    assert exported("--max-caller-share", "1", "--max-per-caller", "20") == 20 + 35
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "data", "--events", "x", "--out", "y", "--max-caller-share", "0"])


def test_a_popular_prompts_thumbs_make_pairs_linear_in_its_answers_each_answer_in_one(store) -> None:
    for i in range(60):  # one prompt every user asks: 40 answers up, 20 down, from 60 users
        c = dataclasses.replace(completion("Summarize this.", [f"answer {i}"]), user=f"user-{i}")
        store.append_completion(c)
        store.append_feedback(feedback(c, "thumb", principal="app", thumb=1 if i % 3 else -1))

    pairs = build_from_event_log(store).pairs

    assert len(pairs) == 40  # max(ups, downs), not 40 x 20 = 800
    assert {p.responses[0] for p in pairs} == {f"answer {i}" for i in range(60) if i % 3}
    assert {p.responses[1] for p in pairs} == {f"answer {i}" for i in range(60) if not i % 3}


def test_a_prompt_rated_many_times_makes_comparisons_of_at_most_four_answers_each_answer_in_one(store) -> None:
    """A popular (or flooded) prompt's ratings: the reward model scores a comparison's answers in
    one batch, so they are split into comparisons of at most 4, each across the range of ratings."""
    for i in range(50):
        c = dataclasses.replace(completion("Rate this.", [f"answer {i}"]), user=f"user-{i}")
        store.append_completion(c)
        store.append_feedback(feedback(c, "rating", principal="app", rating=1 + i % 7))

    comparisons = build_from_event_log(store).rating_pairs

    assert len(comparisons) == 13 and all(2 <= len(c.responses) <= 4 for c in comparisons)
    answered = [r for c in comparisons for r in c.responses]
    assert sorted(answered) == sorted(f"answer {i}" for i in range(50))  # each in exactly one
    rating = {f"answer {i}": 1 + i % 7 for i in range(50)}
    for c in comparisons:  # best first, ties marked
        scores = [rating[r] for r in c.responses]
        assert scores == sorted(scores, reverse=True)
        assert max(scores) - min(scores) >= 4  # each spans the range, not four neighbours
        assert (c.ranks is not None) == (len(set(scores)) < len(scores))


def test_answers_rated_alike_are_still_compared_with_a_differently_rated_one(store) -> None:
    """Four answers rated 7 and one rated 1: a group of answers all rated 7 is compared with the 1
    (which is then in two comparisons), not dropped."""
    for i, rating in enumerate([7, 7, 7, 7, 1]):
        c = dataclasses.replace(completion("Rate alike.", [f"answer {i}"]), user=f"user-{i}")
        store.append_completion(c)
        store.append_feedback(feedback(c, "rating", principal="app", rating=rating))

    comparisons = build_from_event_log(store).rating_pairs

    assert all(2 <= len(c.responses) <= 4 and c.responses[-1] == "answer 4" for c in comparisons)
    assert {r for c in comparisons for r in c.responses} == {f"answer {i}" for i in range(5)}


def test_the_round_threshold_counts_feedback_since_the_last_round_each_caller_capped(store, tmp_path: Path) -> None:
    """What starts a round is the feedback logged since the last one, each caller's latest
    ``max_per_caller``: callers who have each given more than the cap in all still start rounds
    (the growth of the capped whole stops once they all reach it), and a flood counts as the cap."""

    def thumbs(user: str, n: int) -> None:
        for _ in range(n):  # every prompt asked once: no pairs
            c = dataclasses.replace(completion(f"Question {next(_ids)}?", ["an answer"]), user=user)
            store.append_completion(c)
            store.append_feedback(feedback(c, "thumb", principal="app", thumb=1))

    cfg = TrainerConfig(data_dir=tmp_path, max_per_caller=5, min_new_feedback=10**6, take_up_wait_s=0)
    users = [f"user-{i}" for i in range(4)]

    def pending(state: TrainerState) -> float | None:
        poll = poll_once(
            cfg, TrainerFiles.of(tmp_path), PolicyRegistry(tmp_path / "registry"), store,
            RolloutState(stable="base"), state, threading.Event(),
        )  # fmt: skip
        assert poll.status == "waiting" and f"{poll.pending:g} new feedback since the last round" in poll.message
        return poll.pending

    for user in users:
        thumbs(user, 10)
    late = dataclasses.replace(completion("Answered before the round, thumbed after?", ["late"]), user="latecomer")
    store.append_completion(late)
    assert pending(TrainerState()) == 4 * 5 * cfg.thumb_signal  # each caller's latest 5

    last_round = TrainerState(watermark=store.last_seq(), round=1)
    assert pending(last_round) == 0
    for user in users[:3]:  # each past the cap in all: 15 thumbs
        thumbs(user, 5)
    thumbs("mallory", 50)
    store.append_feedback(feedback(late, "thumb", principal="app", thumb=-1))
    # 3 callers' 5 new thumbs, mallory's latest 5 of 50 and the latecomer's thumb on an answer
    # logged before the round; the capped whole grew by mallory's 5 and the latecomer's 1 alone.
    assert pending(last_round) == (3 * 5 + 5 + 1) * cfg.thumb_signal


def test_the_threshold_looks_only_at_what_is_new_and_fetches_the_earlier_answers_its_feedback_is_on(
    store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll's look since the last round reads the entries after it alone, with or without the
    trainer's follower, and gets the same data: the answers logged before it that new feedback is
    on are fetched together by id, once for both sides, and nothing else from before counts."""
    for i in range(30):  # before the last round: 30 thumbed answers
        c = dataclasses.replace(completion(f"Old question {i}?", [f"old {i}"]), user=f"user-{i % 10}")
        store.append_completion(c)
        store.append_feedback(feedback(c, "thumb", principal="app", thumb=1))
    late = dataclasses.replace(completion("Thumbed only after the round?", ["late"]), user="user-0")
    store.append_completion(late)
    since = store.last_seq()
    for i in range(5):
        c = dataclasses.replace(completion(f"New question {i}?", [f"new {i}"]), user=f"user-{i}")
        store.append_completion(c)
        store.append_feedback(feedback(c, "thumb", principal="app", thumb=-1))
    store.append_feedback(feedback(late, "thumb", principal="app", thumb=1))
    fetched: list[set[str]] = []
    get_completions = store.get_completions
    monkeypatch.setattr(store, "get_completions", lambda ids: fetched.append(set(ids)) or get_completions(ids))
    monkeypatch.setattr(store, "get_completion", lambda cid: pytest.fail(f"{cid} fetched alone"))

    follower = LogFollower(store)
    follower.catch_up()
    views = [build_round_data(store, store.last_seq(), 0.5, follower=f, since=since) for f in (follower, None)]

    for data in views:
        judged = sorted((j.response, j.desirable) for d in (data.train, data.heldout) for j in d.judged)
        assert judged == sorted([(f"new {i}", False) for i in range(5)] + [("late", True)])
        assert sorted(p.text or "" for d in (data.train, data.heldout) for p in d.prompts) == sorted(
            f"New question {i}?" for i in range(5)
        )
    assert fetched == [{late.completion_id}, {late.completion_id}]  # one query a view: the late answer alone
    whole = build_round_data(store, store.last_seq(), 0.5, follower=follower)
    assert sum(len(d.judged) for d in (whole.train, whole.heldout)) == 36


def test_no_caller_carries_more_than_its_share_of_the_round_threshold(store, tmp_path: Path) -> None:
    """One caller, or a few, never start a round however much they send (fewer than 1 / share
    callers count 0); a flood among fair callers is weighed down to the share; the pairs that
    callers' thumbs make together count in the same proportion."""
    cfg = TrainerConfig(data_dir=tmp_path, max_caller_share=0.25, min_new_feedback=10**6, take_up_wait_s=0)

    def send(user: str, n: int, prompt: str | None = None, thumb: int = 1) -> None:
        for _ in range(n):
            asked = prompt or f"Question {next(_ids)}?"
            c = dataclasses.replace(completion(asked, [f"answer {next(_ids)}"]), user=user)
            store.append_completion(c)
            store.append_feedback(feedback(c, "thumb", principal="app", thumb=thumb))

    def pending(cfg: TrainerConfig = cfg) -> tuple[float, str]:
        poll = poll_once(
            cfg, TrainerFiles.of(tmp_path), PolicyRegistry(tmp_path / "registry"), store,
            RolloutState(stable="base"), TrainerState(), threading.Event(),
        )  # fmt: skip
        assert poll.status == "waiting" and poll.pending is not None
        return poll.pending, poll.message

    send("mallory", 100)
    assert pending()[0] == 0  # 50 thumbs' worth from one caller: nothing
    assert pending(dataclasses.replace(cfg, max_caller_share=1.0))[0] == 100 * cfg.thumb_signal  # no cap
    for user in ("m2", "m3"):
        send(user, 100)
    count, message = pending()
    assert count == 0  # three: still fewer than 1 / 0.25
    assert "from 3 callers, none above 25% of it (so 4 callers at least)" in message

    for user in ("ann", "bob", "cy", "di", "ed"):
        send(user, 4)
    # 8 callers: the three floods weighed down to 25% each of T, the five fair ones (2 each) whole:
    # T = 10 / (1 - 3 * 0.25) = 40.
    assert pending()[0] == pytest.approx(40.0)

    # A pair made together by two fair callers (an up and a down on one prompt): the pair counts
    # too, in the proportion the capped total bears to what was sent (44 of 161).
    send("ann", 1, "One prompt for two?", thumb=1)
    send("bob", 1, "One prompt for two?", thumb=-1)
    sent = (300 + 22) * cfg.thumb_signal
    total = 22 * cfg.thumb_signal / (1 - 3 * 0.25)
    assert pending()[0] == pytest.approx((sent + 1) * total / sent)


def test_a_key_that_may_not_name_users_is_one_caller_in_the_round_threshold(store, tmp_path: Path) -> None:
    """Eight users made up by a key the server did not trust to name them (logged with
    ``caller``) are one caller: no round; the same eight named by a trusted key are eight."""
    cfg = TrainerConfig(data_dir=tmp_path, max_caller_share=0.25, min_new_feedback=10**6, take_up_wait_s=0)

    def pending() -> float:
        poll = poll_once(
            cfg, TrainerFiles.of(tmp_path), PolicyRegistry(tmp_path / "registry"), store,
            RolloutState(stable="base"), TrainerState(), threading.Event(),
        )  # fmt: skip
        assert poll.pending is not None
        return poll.pending

    def send(caller: str | None) -> None:
        for i in range(8):
            c = completion(f"Question {next(_ids)}?", [f"answer {next(_ids)}"])
            c = dataclasses.replace(c, user=f"made-up-{i}", caller=caller)
            store.append_completion(c)
            store.append_feedback(feedback(c, "thumb", principal="app", thumb=1))

    send("app")
    assert pending() == 0
    send(None)
    # Now 9 callers: the eight users whole (a thumb each), the key's eight capped at 25% of the total.
    assert pending() == pytest.approx(8 * cfg.thumb_signal / (1 - 0.25))
