"""`heed simulate`: the instruction checks, the labelers, the win-rate arithmetic, and the
experiment in miniature on the tiny word-list policy, through the real service and trainer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from heed.simulate import report
from heed.simulate.experiment import SimulateConfig, following, run, win_rate
from heed.simulate.instructions import (
    CONFLICTS,
    Task,
    bullet_list,
    forbid_word,
    include_word,
    lowercase,
    make_tasks,
    max_words,
    one_sentence,
    uppercase,
)
from heed.simulate.labelers import Labeler, population
from tests.word_lists import target_share, train_word_list_policy


@pytest.mark.parametrize(
    ("instruction", "follows", "breaks"),
    [
        (max_words(5), "Four words are here.", "This answer has far more than five words in it."),
        (lowercase(), "all quiet here.", "All quiet here."),
        (uppercase(), "ALL QUIET HERE!", "ALL QUIET here"),
        (include_word("blue"), "The sky is Blue today.", "The sky is grey."),
        (forbid_word("the"), "A sky, grey.", "The sky is grey."),
        (bullet_list(), "- bread\n- tea", "bread and tea"),
        (one_sentence(), "It rains a lot.", "It rains. It pours."),
    ],
)
def test_each_instruction_kind_checks_what_it_says(instruction, follows: str, breaks: str) -> None:
    assert instruction(follows) and not instruction(breaks)
    assert not instruction("   ")  # an empty answer follows nothing


def test_tasks_state_their_instructions_and_are_reproducible() -> None:
    tasks = make_tasks(200, seed=3)
    prompts = [t.prompt for t in tasks]
    assert prompts == [t.prompt for t in make_tasks(200, seed=3)] != [t.prompt for t in make_tasks(200, seed=4)]
    for task in tasks:
        assert 1 <= len(task.instructions) <= 2
        assert all(i.text in task.prompt for i in task.instructions)
        assert frozenset(i.kind for i in task.instructions) not in CONFLICTS
    assert len({i.kind for t in tasks for i in t.instructions}) == 7


def test_labelers_prefer_answers_that_follow_the_instructions() -> None:
    task = Task("Describe tea. Answer in at most 5 words. Use only lowercase letters.", (max_words(5), lowercase()))
    person = Labeler("x", "train", {"max_words": 3.0, "lowercase": 1.0}, noise=0.0)
    assert person.utility(task, "warm and green") == 1.0
    assert person.utility(task, "Warm and green") == 0.75  # the one they care more about is kept
    assert person.utility(task, "Tea is a warm drink that many people like") == 0.0
    assert person.utility(task, "") == 0.0
    rng = random.Random(0)
    assert (
        person.thumb(task, "warm and green", rng) == 1 and person.thumb(task, "Tea is lovely, warm and good", rng) == -1
    )
    ranked = person.rank(task, ["Tea is a warm drink, truly.", "warm and green", "Warm.", "warm tea"], rng)
    assert ranked == [[1, 3], 2, 0]  # two perfect answers tie, then the one rule followed, then none
    assert person.compare(task, "warm tea", "Tea is a warm drink, truly.", rng) == 1.0
    assert person.compare(task, "warm tea", "green tea", rng) == 0.5


def test_a_population_splits_training_and_heldout_labelers_with_their_own_tastes() -> None:
    people = population(5, 3, seed=1)
    assert [p.group for p in people] == ["train"] * 5 + ["heldout"] * 3
    assert len({tuple(sorted(p.weights.items())) for p in people}) == 8
    assert all(0.1 <= p.noise <= 0.3 for p in people)


def test_win_rate_and_following_count_what_they_should() -> None:
    tasks = make_tasks(60, seed=5)
    judges = population(0, 4, seed=2)
    obeying = ["- ok\n- fine" if "list" in t.prompt else "ok" for t in tasks]  # short, lowercase, one line
    rambling = ["Well, THE answer Is a long one, and it goes on. And on." for _ in tasks]
    better = win_rate(tasks, rambling, obeying, judges, seed=0)
    assert better["win_rate"] > 0.75 and better["low"] > 0.5 and better["prompts"] == 60 and better["judges"] == 4
    same = win_rate(tasks, obeying, obeying, judges, seed=0)
    assert same["low"] < 0.5 < same["high"]
    assert following(tasks, obeying)["max_words"] == 1.0 and following(tasks, rambling)["max_words"] == 0.0


def test_the_experiment_in_miniature_held_out_labelers_prefer_the_trained_policy(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The word-list policy cannot read instructions, so the labelers here care about one thing
    it can learn, more of the words red, blue and green (as in tests/loop), besides noise."""
    base = train_word_list_policy(tiny_model, tmp_path / "sft")
    for key, value in {
        "HEED_TRAINER_POLL_S": "1",
        "HEED_TRAINER_MIN_NEW_COMPARISONS": "200",
        "HEED_TRAINER_RM_LR": "3e-4",
        "HEED_TRAINER_RM_EPOCHS": "4",
        "HEED_TRAINER_RM_MAX_COMPARISONS": "512",
        "HEED_TRAINER_PTX_COEF": "0.25",
        "HEED_TRAINER_PPO_ITERATIONS": "12",
        "HEED_TRAINER_PPO_EPISODES": "16",
        "HEED_TRAINER_PPO_MINIBATCH_SIZE": "16",
        "HEED_TRAINER_PPO_LR": "1e-3",
        "HEED_TRAINER_VALUE_LR": "1e-3",
        "HEED_TRAINER_MAX_NEW_TOKENS": "8",
        "HEED_TRAINER_MIN_RM_ACCURACY": "0.7",
        "HEED_TRAINER_MIN_WIN_RATE": "0.6",
        "HEED_TRAINER_MAX_KL": "50",
        "HEED_TRAINER_NICE": "0",
    }.items():
        monkeypatch.setenv(key, value)
    extra = {"target_words": lambda task, answer: target_share(answer) >= 1 / 3}
    rng = random.Random(0)
    labelers = [
        Labeler(f"{group}-{i}", group, {"target_words": 1.0}, noise=round(rng.uniform(0.2, 0.4), 2))
        for i, group in enumerate(["train"] * 8 + ["heldout"] * 4)
    ]
    cfg = SimulateConfig(
        model=str(base),
        out=tmp_path / "run",
        minutes=8,
        promotions=1,
        workers=3,
        rank_share=0.7,
        k=4,
        max_tokens=8,
        eval_prompts=80,
        eval_temperature=1.0,
        pause_s=0.02,
        enforce_eager=True,
        min_feedback_per_step=30,
    )
    results = run(cfg, extra=extra, labelers=labelers)
    report.write(results, cfg.out)

    assert results["final_version"] != results["start_version"], (cfg.out / "server.log").read_text()[-3000:]
    assert [d["action"] for d in results["decisions"]][-1] == "promoted"
    assert results["feedback"]["failures"] == 0 and results["feedback"]["rankings"] > 0
    heldout = results["heldout"]
    assert heldout["low"] > 0.5, heldout  # above a coin flip by more than the noise explains
    assert results["rounds"][-1]["rm_heldout_accuracy"] >= 0.7
    assert (cfg.out / "results.md").read_text().count("held-out labelers") == 1 and (cfg.out / "results.png").exists()
