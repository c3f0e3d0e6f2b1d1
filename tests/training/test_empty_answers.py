"""Empty answers in PPO and the round's win rate (training/ppo.py empty_last, training/data.py
empty_answers): an answer with no visible text never scores above one with text, whatever the
reward model says of it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from training.data import empty_answers
from training.ppo import empty_last


def test_an_answer_is_empty_when_it_has_no_visible_text(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    eos = tokenizer.eos_token_id
    words = tokenizer("blue sea", add_special_tokens=False).input_ids
    blank = tokenizer("  \n ", add_special_tokens=False).input_ids
    assert empty_answers(tokenizer, [[], [eos], blank + [eos], words + [eos], words]) == [
        True, True, True, False, False,
    ]  # fmt: skip


def test_empty_answers_score_below_every_answer_with_text() -> None:
    scores = torch.tensor([0.5, 3.0, -1.0, 2.0])
    out = empty_last(scores, [False, True, False, True])
    assert out.tolist() == [0.5, -2.0, -1.0, -2.0]  # the lowest with text (-1.0), less 1
    assert torch.equal(empty_last(scores, [False] * 4), scores)  # none empty: unchanged
    assert empty_last(scores, [True] * 4).tolist() == [-2.0] * 4  # all empty: all alike, no preference
