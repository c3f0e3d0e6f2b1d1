"""The learnable taste the training and loop tests share: a tiny policy taught to answer with
six random words of WORDS, and people who prefer answers with more of the TARGET words."""

from __future__ import annotations

import random
import re
from pathlib import Path

from training.data import Demonstration, write_jsonl
from training.sft import SFTConfig, train_sft

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain"]
TARGET = ["red", "blue", "green"]
PROMPTS = ["List some words.", "Say a few words.", "Give me words.", "Words, please."]


def train_word_list_policy(tiny_model: Path, root: Path, demonstrations: int = 256, steps: int = 40) -> Path:
    """SFT ``tiny_model`` to answer every prompt with 6 random words of WORDS; returns the folder."""
    rng = random.Random(0)
    demos = [Demonstration(rng.choice(PROMPTS), " ".join(rng.choices(WORDS, k=6))) for _ in range(demonstrations)]
    write_jsonl(root / "demos.jsonl", demos)
    cfg = SFTConfig(
        model=str(tiny_model),
        train=root / "demos.jsonl",
        out=root / "sft",
        max_steps=steps,
        batch_size=16,
        lr=4e-3,
        warmup_steps=5,
        eval_every=1000,
        progress=False,
    )
    return train_sft(cfg)


def target_share(text: str) -> float:
    """The share of an answer's words that are TARGET words."""
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in TARGET for w in words) / max(len(words), 1)
