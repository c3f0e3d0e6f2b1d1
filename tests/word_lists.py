"""The learnable taste the training and loop tests share: a tiny policy taught to answer with
six random words of WORDS, and people who prefer answers with more of the TARGET words."""

from __future__ import annotations

import random
import re
from pathlib import Path

from training.config import SFTConfig
from training.data import Demonstration
from training.sft import train_sft

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain"]
TARGET = ["red", "blue", "green"]
PROMPTS = ["List some words.", "Say a few words.", "Give me words.", "Words, please."]


def train_word_list_policy(tiny_model: Path, root: Path, demonstrations: int = 256, steps: int = 40) -> Path:
    """SFT ``tiny_model`` to answer every prompt with 6 random words of WORDS; returns the folder."""
    rng = random.Random(0)
    demos = [Demonstration(rng.choice(PROMPTS), " ".join(rng.choices(WORDS, k=6))) for _ in range(demonstrations)]
    return teach(tiny_model, root, demos, steps)


def teach(tiny_model: Path, root: Path, demos: list[Demonstration], steps: int = 40) -> Path:
    """SFT ``tiny_model`` on ``demos`` (quickly, at a high learning rate); returns the folder."""
    cfg = SFTConfig(
        model=str(tiny_model),
        out=root / "sft",
        max_steps=steps,
        batch_size=16,
        lr=4e-3,
        warmup_steps=5,
        eval_every=1000,
        progress=False,
    )
    return train_sft(cfg, demos).model


def target_share(text: str) -> float:
    """The share of an answer's words that are TARGET words."""
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in TARGET for w in words) / max(len(words), 1)


# The trainer's settings for a loop on the word-list policy (tests/loop, tests/simulate): small,
# fast rounds that learn the taste reliably enough to be tested.
LOOP_TRAINER_ENV = {
    "HEED_TRAINER_POLL_S": "1",
    # Each thumb counts 0.5 and makes about one (up, down) pair of its prompt's answers. At 1,500
    # (about 1,000 thumbs and 660 pairs) round 1's reward model reached 0.95 held-out accuracy in
    # one run but 0.73 and 0.65 in the two loop tests of one CI run (below the floor, so a second
    # round trained: 4 more minutes under the users' load); round 2 there, on about 3,400, reached
    # 0.97 and 0.95. So round 1 waits for that much: about 2,300 thumbs, two minutes of these users.
    "HEED_TRAINER_MIN_NEW_FEEDBACK": "3500",
    # At 3e-4 a round's reward model either learned the taste or stayed at chance: on one CI
    # run's round-1 data (2,048 examples), seed 0 gave held-out accuracy 0.48 and seed 1 gave
    # 1.00. At 1e-4 it learned with each of 4 seeds (offline, 65-75 s each, 2026-12-03).
    "HEED_TRAINER_RM_LR": "1e-4",
    "HEED_TRAINER_RM_EPOCHS": "4",
    "HEED_TRAINER_RM_BATCH_SIZE": "8",
    # 512 of them left the reward model at chance for some seeds (0.53 on round 1's data with seed
    # 0; 2 of 3 seeds passed 0.75), and six rounds in a row failed the floor in one CI run; 1024
    # passed 0.94-1.0 on 6 of 6 seeds, at 37 s a reward model instead of 18 (offline, 2026-12-01).
    "HEED_TRAINER_RM_MAX_EXAMPLES": "1024",
    # The ptx mix is the logged answers, i.e. the base policy's own: at gamma 1 it held PPO back
    # so far that one CI run's v2 was liked only 3 points more often than base (0.35 vs 0.32).
    "HEED_TRAINER_PTX_COEF": "0.25",
    "HEED_TRAINER_PPO_ITERATIONS": "12",
    "HEED_TRAINER_PPO_EPISODES": "16",
    "HEED_TRAINER_PPO_MINIBATCH_SIZE": "16",
    "HEED_TRAINER_PPO_LR": "1e-3",
    # In adapter mode, the LoRA adapter's (r 8, alpha 16). At 1e-3 two rounds moved the policy by a KL
    # of 0.03 and 0.02 (full fine-tuning at 1e-3: 4.4-5.6) and were rejected for a win rate of 0.5-0.63.
    "HEED_TRAINER_ADAPTER_LR": "1e-2",
    "HEED_TRAINER_VALUE_LR": "1e-3",
    "HEED_TRAINER_MAX_NEW_TOKENS": "8",
    "HEED_TRAINER_EVAL_PROMPTS": "32",
    # The tiny reward model sometimes learns little (held-out accuracy 0.55 seen); the win rate it
    # judges is then noise. Such a round is rejected and the next one, with more data, retrains.
    # At lr 1e-4, round 1's data gave 0.94, 0.86, 1.00 and 0.69 for seeds 0-3 (thumbs AUC 0.86 at
    # 0.69: it learned); a reward model at chance (0.48, AUC 0.55) still fails this floor.
    "HEED_TRAINER_MIN_RM_ACCURACY": "0.65",
    # The floor as it is (no allowance for the held-out count's noise): these loops assert it.
    "HEED_TRAINER_RM_ACCURACY_Z": "0",
    # Calibration is not what these loops test: a reward model that ranked 0.95 of the held-out
    # pairs right was rejected for an ECE of 0.308 against the default 0.3 in one CI run.
    "HEED_TRAINER_MAX_THUMBS_ECE": "1.0",
    "HEED_TRAINER_MIN_WIN_RATE": "0.65",
    "HEED_TRAINER_MAX_KL": "50",
    "HEED_TRAINER_NICE": "0",  # the test waits for the trainer; in production it yields to serving
}
