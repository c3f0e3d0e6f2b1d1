"""`heed simulate` in miniature: the experiment on the tiny word-list policy, through the real
service and trainer; held-out labelers must prefer the trained policy by more than the noise.

Earlier labelers (noise 0.2-0.3, ties within 0.5) gave win rates of 62.2% [55.7, 68.7] and
56.2% [50.1, 62.4], and one run's reward models never reached the gate's 0.7. With the
population's noise (0.05-0.15, ties within 0.3), separate caller ids per session and a KL bound
of 5 at the gate, two runs won 83.9% [80.6, 87.3] and 58.9% [54.0, 63.7]; a third timed out
after twelve rounds rejected for KL. With PPO stopping at the gate's KL bound, 76.9% [72.4, 81.3]
and 84.7% [81.4, 87.9] (docs/results.md)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from heed.simulate import report
from heed.simulate.experiment import SimulateConfig, run
from heed.simulate.instructions import Task
from heed.simulate.labelers import Labeler
from tests.word_lists import LOOP_TRAINER_ENV, PROMPTS, target_share, train_word_list_policy

pytestmark = pytest.mark.slow  # trains a policy, then runs `heed serve --with-trainer`


def word_list_tasks(count: int, seed: int) -> list[Task]:
    rng = random.Random(seed)
    return [Task(rng.choice(PROMPTS), ()) for _ in range(count)]


# The labelers' one taste: more of the words red, blue and green (at least a third of the answer).
TARGET_WORDS = {"target_words": lambda task, answer: target_share(answer) >= 1 / 3}


def word_list_labelers() -> list[Labeler]:
    """8 training and 4 held-out labelers who care about TARGET_WORDS only, with their own noise."""
    rng = random.Random(0)
    return [
        Labeler(f"{group}-{i}", group, {"target_words": 1.0}, noise=round(rng.uniform(0.05, 0.15), 2), tie_margin=0.3)
        for i, group in enumerate(["train"] * 8 + ["heldout"] * 4)
    ]


# The run's own bounds: about 1 minute to start, an 8-minute feedback phase at most (it ends at the
# first promotion, after 2-5 minutes when the rounds go well), 2 minutes to settle, 1 to stop.
@pytest.mark.timeout(900)
def test_the_experiment_in_miniature_held_out_labelers_prefer_the_trained_policy(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The word-list policy cannot read instructions, and the tiny reward model did not learn the
    taste behind long, varied instruction prompts (held-out accuracy about 0.5 on 400 rankings).
    So the prompts are the word-list policy's own, and the labelers care about one thing it can
    learn: more of the words red, blue and green (as in tests/loop), besides noise. They tie
    answers they like (or dislike) alike: the rankings' pairs are then the taste, not noise."""
    base = train_word_list_policy(tiny_model, tmp_path / "sft")
    overrides = {
        "HEED_TRAINER_MIN_NEW_FEEDBACK": "300",
        "HEED_TRAINER_RM_LR": "3e-4",  # what it passed with (the loop tests' thumbs now take 1e-4)
        "HEED_TRAINER_MIN_RM_ACCURACY": "0.7",
        "HEED_TRAINER_RM_ACCURACY_Z": "0",  # the floor as it is: asserted below
        # A policy that pleased its RM too much (KL 8.7, RM-judged 81%) won only 56% with the
        # held-out labelers: the gate holds the KL down and wants a clear RM-judged win.
        "HEED_TRAINER_MAX_KL": "5",
        "HEED_TRAINER_MIN_WIN_RATE": "0.7",
    }
    for key, value in {**LOOP_TRAINER_ENV, **overrides}.items():
        monkeypatch.setenv(key, value)
    extra, labelers = TARGET_WORDS, word_list_labelers()
    cfg = SimulateConfig(
        model=str(base),
        out=tmp_path / "run",
        minutes=8,
        promotions=1,
        workers=3,
        rank_share=0.7,
        k=4,
        max_tokens=8,
        eval_prompts=200,
        eval_temperature=1.0,
        pause_s=0.02,
        enforce_eager=True,
        min_feedback_per_step=30,
        settle_minutes=2,
    )
    results = run(cfg, extra=extra, labelers=labelers, tasks=word_list_tasks)
    report.write(results, cfg.out)

    assert results["final_version"] != results["start_version"], (cfg.out / "server.log").read_text()[-3000:]
    # The final policy is one the controller promoted (later rounds may publish more, and the
    # controller may refuse a version not trained from the new stable one).
    assert results["final_version"] in [d["version"] for d in results["decisions"] if d["action"] == "promoted"]
    assert results["feedback"]["failures"] == 0 and results["feedback"]["rankings"] > 0
    heldout = results["heldout"]
    assert heldout["low"] > 0.5, heldout  # above a coin flip by more than the noise explains
    assert results["rounds"][-1]["rm_heldout_accuracy"] >= 0.7
    table = (cfg.out / "results.md").read_text()
    assert f"| held-out labelers (gave no feedback) | {heldout['win_rate']:.1%} |" in table, table
    assert (cfg.out / "results.png").exists()


def unique_word_list_tasks(count: int, seed: int) -> list[Task]:
    """The word-list policy's prompts, each made a prompt of its own (as an app's users ask)."""
    rng = random.Random(seed)
    return [Task(f"{rng.choice(PROMPTS)} ({seed}-{i})", ()) for i in range(count)]


@pytest.mark.skipif(
    os.environ.get("HEED_TEST_APP_MINIATURE") != "1",
    reason="opt-in (about 10 minutes, beyond CI's budget): HEED_TEST_APP_MINIATURE=1",
)
@pytest.mark.timeout(1200)
def test_the_app_shaped_experiment_in_miniature_learns_from_unpaired_thumbs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--feedback app` on the word-list policy: every prompt asked once, one answer each, thumbs on
    about half, ratings on a tenth, no rankings, so no two thumbs pair up. The reward model learns
    the taste from the unpaired thumbs and ratings alone (judged by its held-out thumbs AUC), and
    the held-out labelers prefer the trained policy by more than the noise."""
    base = train_word_list_policy(tiny_model, tmp_path / "sft")
    overrides = {
        "HEED_TRAINER_MIN_NEW_FEEDBACK": "200",
        "HEED_TRAINER_RM_MAX_EXAMPLES": "0",
        "HEED_TRAINER_MIN_THUMBS_AUC": "0.7",
        "HEED_TRAINER_MAX_KL": "5",
        "HEED_TRAINER_MIN_WIN_RATE": "0.7",
    }
    for key, value in {**LOOP_TRAINER_ENV, **overrides}.items():
        monkeypatch.setenv(key, value)
    extra, labelers = TARGET_WORDS, word_list_labelers()
    cfg = SimulateConfig(
        model=str(base),
        out=tmp_path / "run",
        feedback="app",
        minutes=12,
        promotions=1,
        workers=3,
        max_tokens=8,
        eval_prompts=200,
        eval_temperature=1.0,
        pause_s=0.02,
        enforce_eager=True,
        min_feedback_per_step=30,
        settle_minutes=2,
    )
    results = run(cfg, extra=extra, labelers=labelers, tasks=unique_word_list_tasks)
    report.write(results, cfg.out)

    feedback = results["feedback"]
    assert feedback["mode"] == "app" and feedback["failures"] == 0 and feedback["rankings"] == 0
    assert feedback["prompts_repeated"] == 0 and feedback["prompts_distinct"] == feedback["requests"]
    assert feedback["thumbs"] > 0 and feedback["ratings"] > 0
    assert results["final_version"] != results["start_version"], (cfg.out / "server.log").read_text()[-3000:]
    published = [r for r in results["rounds"] if r["decision"].startswith("published")]
    assert published and published[0]["rm_heldout"]["thumbs_auc"] >= 0.7
    heldout = results["heldout"]
    assert heldout["low"] > 0.5, heldout
    assert "Every prompt asked once" in (cfg.out / "results.md").read_text()
