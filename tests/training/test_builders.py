"""Training data built from a real event log: rankings, thumbs, corrections and prompts."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, open_store
from heed.prompts import ServedPrompt
from training.builders import build_from_event_log, export
from training.data import Comparison, Demonstration, read_comparisons, read_demonstrations, read_prompts

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
    assert data.pairs == [Comparison(served("Say hi."), ("Hi!", "Go away."))]
    assert data.demonstrations == [Demonstration(chat_prompt, "2 + 2 = 4.")]
    assert data.prompts == [served("Name a colour."), served("Say hi."), chat_prompt]
    assert data.watermark == store.last_seq()

    export(data, tmp_path / "data")
    assert read_comparisons(tmp_path / "data" / "comparisons.jsonl", strict=True) == data.comparisons + data.pairs
    assert read_demonstrations(tmp_path / "data" / "demonstrations.jsonl", strict=True) == data.demonstrations
    assert read_prompts(tmp_path / "data" / "prompts.jsonl", strict=True) == data.prompts


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

    assert ann_bob.pairs == [Comparison(served("Pick a pet."), ("cat", "dog"))]
    assert ann_carol.pairs == [Comparison(served("Pick a pet."), ("cat", "fish"))]
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
    assert data.pairs == [Comparison(served("Say hi."), ("Hi!", "No."))]
    assert data.demonstrations == [Demonstration(ServedPrompt(token_ids=(7, 8, 9)), "Hello.")]
