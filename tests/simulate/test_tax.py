"""The alignment-tax measurement of `heed simulate`: two PPO runs from the same policy against the
same reward model, with the pretraining mix (gamma > 0) and without; the NLL of the text's
held-out half is measured before and after each."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from heed.simulate.tax import alignment_tax, split, text_nll
from tests.word_lists import PROMPTS, train_word_list_policy
from training.reward import RewardModel

pytestmark = pytest.mark.slow  # trains a policy, a reward model and two PPO runs

NOUNS = ["farmer", "river", "engine", "teacher", "window", "garden", "letter", "market"]
VERBS = ["carried", "painted", "watched", "opened", "followed", "crossed"]
ADJECTIVES = ["old", "quiet", "narrow", "busy", "yellow", "heavy"]


def sentences(count: int, seed: int) -> list[str]:
    """Plain text of one small grammar: what the mix teaches carries over to its held-out half."""
    rng = random.Random(seed)
    return [
        f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
        for _ in range(count)
    ]


def test_the_pretraining_mix_keeps_the_tax_below_plain_ppo(tiny_model: Path, tmp_path: Path) -> None:
    policy = train_word_list_policy(tiny_model, tmp_path / "sft")
    torch.manual_seed(0)
    RewardModel.from_causal_lm(policy).save_pretrained(tmp_path / "rm")  # any scorer: not what is tested
    texts = sentences(48, seed=1)
    mix, heldout = split(texts)
    assert len(mix) == len(heldout) == 24 and mix + heldout == texts

    result = alignment_tax(
        policy, tmp_path / "rm", PROMPTS, texts, tmp_path / "tax",
        ptx_coef=1.0, iterations=3, episodes=16, max_new_tokens=8, lr=1e-3, value_lr=1e-3, minibatch_size=16,
    )  # fmt: skip

    assert result["heldout_texts"] == result["mix_texts"] == 24
    assert result["nll_start"] == pytest.approx(text_nll(policy, heldout), abs=1e-4)
    ptx, plain = result["runs"]["ptx"], result["runs"]["no_ptx"]
    assert (ptx["ptx_coef"], plain["ptx_coef"]) == (1.0, 0.0)
    for run in (ptx, plain):
        assert run["nll_change"] == pytest.approx(run["nll"] - result["nll_start"])
        assert run["nll"] == pytest.approx(
            text_nll(tmp_path / "tax" / ("ptx" if run is ptx else "no_ptx") / "model", heldout), abs=1e-4
        )
    # The mix is the same grammar as the held-out half: with it the NLL falls; without, it does not.
    assert ptx["nll_change"] < -0.1 and ptx["nll_change"] < plain["nll_change"] - 0.1, result
