"""One prompt encoding for both halves (heed/prompts.py): the server encodes with it, and the
trainer trains on the ids the server logged, never on a re-encoding of the text."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, open_store
from heed.prompts import ServedPrompt, encode_chat, encode_raw, served_prompt
from serving.completions import CompletionService
from serving.errors import InvalidRequest
from serving.requests import GenerationRequest
from training.builders import build_from_event_log, export
from training.data import prompt_ids, read_comparisons, read_prompts

CHAT = ({"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"})


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def served_by_the_server(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """What CompletionService._tokenize gives the engine (and the log) for this request."""
    slot: Any = SimpleNamespace(tokenizer=tokenizer)
    return CompletionService._tokenize(None, slot, request)  # type: ignore[arg-type]


def test_the_developer_role_is_the_system_role_of_the_chat_template(tokenizer) -> None:
    as_system = ({"role": "system", "content": "Answer in one word."}, CHAT[1])
    ids = encode_chat(tokenizer, CHAT)
    text = tokenizer.decode(ids)

    assert ids == encode_chat(tokenizer, as_system)
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")  # the assistant's turn is opened
    request = GenerationRequest("chat.completions", "heed", messages=[dict(m) for m in CHAT])
    assert served_by_the_server(tokenizer, request) == ids
    assert prompt_ids(tokenizer, CHAT) == ids  # a training file's chat: the same encoding


def test_a_raw_completions_prompt_has_no_template_and_a_file_string_is_a_user_turn(tokenizer) -> None:
    text = "The capital of France is"
    raw = encode_raw(tokenizer, text)

    assert tokenizer.decode(raw) == text  # no template, no special tokens
    assert served_by_the_server(tokenizer, GenerationRequest("completions", "heed", prompt=text)) == raw
    assert prompt_ids(tokenizer, ServedPrompt(text=text)) == raw  # a /v1/completions prompt without its ids
    as_user_turn = prompt_ids(tokenizer, text)  # a training file's string prompt
    assert as_user_turn == encode_chat(tokenizer, [{"role": "user", "content": text}]) != raw


def test_a_prompt_carrying_served_ids_is_exactly_those_ids(tokenizer) -> None:
    ids = (504, 3575, 282, 4649)
    assert prompt_ids(tokenizer, ServedPrompt(text="anything at all", token_ids=ids)) == list(ids)
    assert prompt_ids(tokenizer, ServedPrompt(messages=CHAT, token_ids=ids)) == list(ids)
    assert prompt_ids(tokenizer, ServedPrompt(token_ids=ids)) == list(ids)
    with pytest.raises(ValueError):
        ServedPrompt()
    no_template = SimpleNamespace(chat_template=None)
    with pytest.raises(InvalidRequest, match="no chat template"):
        served_by_the_server(no_template, GenerationRequest("chat.completions", "heed", messages=[dict(CHAT[1])]))


def _logged(n: int, tokenizer: Any, *, prompt: str | None = None, messages: Any = None) -> CompletionRecord:
    if messages is not None:
        ids = encode_chat(tokenizer, messages)
    else:
        assert prompt is not None
        ids = encode_raw(tokenizer, prompt)
    return CompletionRecord(
        completion_id=f"cmpl-{n}",
        created=1000.0 + n,
        principal="app",
        policy_version="v1",
        endpoint="completions" if messages is None else "chat.completions",
        prompt=prompt,
        messages=messages,
        prompt_token_ids=tuple(ids),
        params={"n": 2, "temperature": 1.0},
        choices=(ChoiceRecord(0, " Paris.", (7, 8), "stop"), ChoiceRecord(1, " Lyon.", (9, 10), "stop")),
        prompt_tokens=len(ids),
        completion_tokens=4,
        latency_s=0.1,
    )


def test_the_builders_carry_the_logged_ids_into_comparisons_demonstrations_and_episodes(
    tokenizer, tmp_path: Path
) -> None:
    store = open_store(tmp_path / "events.db")
    raw = _logged(0, tokenizer, prompt="The capital of France is")
    chat = _logged(1, tokenizer, messages=CHAT)
    for n, c in enumerate((raw, chat)):
        store.append_completion(c)
        store.append_feedback(
            FeedbackRecord(f"fb-{n}", c.completion_id, 2000.0 + n, "alice", "ranking", ranking=(1, 0))
        )
    store.append_feedback(FeedbackRecord("fb-2", raw.completion_id, 2003.0, "alice", "correction", correction="Paris"))

    data = build_from_event_log(store)
    export(data, tmp_path / "data")
    store.close()

    served = [list(raw.prompt_token_ids), list(chat.prompt_token_ids)]
    assert [prompt_ids(tokenizer, c.prompt) for c in data.comparisons] == served
    assert [c.prompt for c in data.comparisons] == [served_prompt(raw), served_prompt(chat)]
    assert [prompt_ids(tokenizer, d.prompt) for d in data.demonstrations] == served[:1]
    assert [prompt_ids(tokenizer, p) for p in data.prompts] == served
    # Through the files the trainer hands its stages: the PPO prompt pool and the RM's comparisons.
    pool = read_prompts(tmp_path / "data" / "prompts.jsonl", strict=True)
    assert [prompt_ids(tokenizer, p) for p in pool] == served
    comparisons = read_comparisons(tmp_path / "data" / "comparisons.jsonl", strict=True)
    # The two rankings, then the correction ("Paris" over the raw prompt's answer).
    assert [prompt_ids(tokenizer, c.prompt) for c in comparisons] == served + served[:1]
    assert [c.kind for c in comparisons] == ["ranking", "ranking", "correction"]
    # Before, the raw prompt's text was re-encoded as a user turn: a different input than served.
    assert prompt_ids(tokenizer, "The capital of France is") != served[0]


def test_ids_another_tokenizer_served_are_re_encoded_from_the_text_not_fatal(tokenizer) -> None:
    foreign = (len(tokenizer) + 5, 1)  # a log from a model with a larger vocabulary

    assert prompt_ids(tokenizer, ServedPrompt(text="Hi there", token_ids=foreign)) == encode_raw(tokenizer, "Hi there")
    with pytest.raises(ValueError, match="vocabulary"):
        prompt_ids(tokenizer, ServedPrompt(token_ids=foreign))  # nothing else to encode
