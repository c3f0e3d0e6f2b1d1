"""The training half's builders, on an event log filled through the real serving API."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from heed.eventlog import open_store
from heed.prompts import ServedPrompt, encode_chat, encode_raw
from training.builders import build_from_event_log, export
from training.data import Prompt, prompt_ids, read_comparisons, read_prompts
from training.ppo import prompt_pool
from training.reward import encode_example
from training.round import build_round_data


def text_of(prompt: Prompt) -> str | None:
    assert isinstance(prompt, ServedPrompt) and prompt.token_ids  # a logged prompt, with its served ids
    return prompt.text


def test_feedback_given_through_the_api_becomes_comparisons_pairs_demonstrations_and_prompts(server) -> None:
    store = open_store(server.data_dir / "events.db")
    watermark = store.last_seq()
    with httpx.Client(base_url=server.http_url, headers=server.headers("bob"), timeout=60) as http:

        def complete(prompt: str, n: int, seed: int = 11) -> dict:
            body = {"model": "heed", "prompt": prompt, "max_tokens": 6, "n": n, "seed": seed}
            return http.post("/v1/completions", json=body).json()

        def feedback(**body: object) -> None:
            assert http.post("/v1/feedback", json=body).status_code == 201

        ranked = complete("Rank these answers", 4)
        feedback(completion_id=ranked["id"], ranking=[3, 1, 0, 2])
        tied = complete("Rank these, ties allowed", 3)
        feedback(completion_id=tied["id"], ranking=[[2, 0], 1])
        liked, disliked = complete("Tell me a joke", 1, seed=1), complete("Tell me a joke", 1, seed=2)
        feedback(completion_id=liked["id"], thumb=1)
        feedback(completion_id=disliked["id"], thumb=-1)
        corrected = complete("Say hello", 1)
        feedback(completion_id=corrected["id"], correction="Hello!")

    data = build_from_event_log(store, watermark)
    store.close()

    texts = [c["text"] for c in ranked["choices"]]
    comparison, with_tie = data.comparisons
    assert text_of(comparison.prompt) == "Rank these answers"
    assert list(comparison.responses) == [texts[3], texts[1], texts[0], texts[2]] and comparison.ranks is None
    tied_texts = [c["text"] for c in tied["choices"]]
    assert list(with_tie.responses) == [tied_texts[2], tied_texts[0], tied_texts[1]]
    assert with_tie.ranks == (0, 0, 1)  # 2 and 0 tied above 1: no pair between 2 and 0
    (pair,) = data.pairs  # two different answers (two seeds): the one voted up first
    assert text_of(pair.prompt) == "Tell me a joke"
    assert list(pair.responses) == [liked["choices"][0]["text"], disliked["choices"][0]["text"]]
    (demonstration,) = data.demonstrations
    assert (text_of(demonstration.prompt), demonstration.response) == ("Say hello", "Hello!")
    assert sorted(text_of(p) or "" for p in data.prompts) == [
        "Rank these answers",
        "Rank these, ties allowed",
        "Say hello",
        "Tell me a joke",
    ]
    assert data.watermark > watermark


@pytest.mark.slow
def test_the_trainer_trains_on_the_prompt_ids_that_were_served(server, tokenizer_dir: Path, tmp_path: Path) -> None:
    """A raw /v1/completions prompt (no chat template) and a chat with a developer message, each
    ranked: the trainer's round data, its reward-model sequences and its PPO episodes (and `heed
    train`'s exported files) start from exactly the ids the server encoded and logged."""
    store = open_store(server.data_dir / "events.db")
    watermark = store.last_seq()
    client = OpenAI(base_url=server.http_url + "/v1", api_key=server.keys["bob"], max_retries=0)
    raw = client.completions.create(
        model="heed", prompt="The capital of France is", n=2, max_tokens=6, temperature=1.0, seed=5
    )
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    chat = client.chat.completions.create(
        model="heed",
        messages=messages,  # type: ignore[arg-type]
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=5,
    )
    with httpx.Client(base_url=server.http_url, headers=server.headers("bob"), timeout=60) as http:
        for completion_id in (raw.id, chat.id):
            ranked = http.post("/v1/feedback", json={"completion_id": completion_id, "ranking": [1, 0]})
            assert ranked.status_code == 201, ranked.text

    data = build_from_event_log(store, watermark)
    logged = [store.get_completion(raw.id), store.get_completion(chat.id)]
    store.close()

    assert all(c is not None for c in logged)
    served = [list(c.prompt_token_ids) for c in logged if c is not None]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # the tiny model's tokenizer
    assert served == [encode_raw(tokenizer, "The capital of France is"), encode_chat(tokenizer, messages)]
    assert [raw.usage.prompt_tokens, chat.usage.prompt_tokens] == [len(ids) for ids in served]  # type: ignore[union-attr]
    assert tokenizer.decode(served[1]).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")

    # The reward model's comparisons: each prompt as served, its answers best first.
    assert len(data.comparisons) == 2
    assert [prompt_ids(tokenizer, c.prompt) for c in data.comparisons] == served
    assert [list(c.responses) for c in data.comparisons] == [
        [raw.choices[1].text, raw.choices[0].text],
        [chat.choices[1].message.content, chat.choices[0].message.content],
    ]
    # PPO's episodes: sampled from prompt_ids of the pool, which the trainer hands train_ppo as it
    # is or which `heed train ppo --prompts` reads from the exported prompts.jsonl.
    assert [prompt_ids(tokenizer, p) for p in data.prompts] == served
    export(data, tmp_path / "data")
    pool = read_prompts(tmp_path / "data" / "prompts.jsonl", strict=True)
    assert [prompt_ids(tokenizer, p) for p in pool] == served
    comparisons = read_comparisons(tmp_path / "data" / "comparisons.jsonl", strict=True)
    assert [prompt_ids(tokenizer, c.prompt) for c in comparisons] == served
    # What a trainer round trains on: its comparisons' reward-model sequences and its episodes.
    round_data = build_round_data(store_again := open_store(server.data.events), data.watermark, heldout_fraction=0.0)
    store_again.close()
    mine = [c for c in round_data.train.comparisons if prompt_ids(tokenizer, c.prompt) in served]
    assert len(mine) == 2
    for comparison, ids in zip(mine, served, strict=True):
        answers, _ = encode_example(tokenizer, comparison, max_length=10_000)
        assert all(seq[: len(ids)] == ids for seq in answers)  # every answer scored after the served prompt
    episodes = prompt_pool(tokenizer, round_data.train.prompts, max_prompt_length=10_000)
    assert all(ids in episodes for ids in served)
    # The bug this pins: re-encoding the raw text as a training file's user turn is another input.
    assert prompt_ids(tokenizer, "The capital of France is") != served[0]
