"""`heed simulate`: the instruction checks, the labelers and the win-rate arithmetic (the
experiment itself, in miniature, is in test_miniature.py)."""

from __future__ import annotations

import random

import pytest

from heed.eventlog import held_out
from heed.simulate.experiment import UniqueTasks, eval_callers, following, trainer_config, win_rate
from heed.simulate.instructions import (
    CONFLICTS,
    DEFAULT_KINDS,
    Task,
    bullet_list,
    forbid_word,
    include_word,
    lowercase,
    make_tasks,
    max_words,
    one_sentence,
    prompt_space,
    uppercase,
    write_answer,
)
from heed.simulate.labelers import Labeler, population


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
    chosen = {i.kind for t in make_tasks(200, seed=3, kinds=DEFAULT_KINDS) for i in t.instructions}
    assert chosen == set(DEFAULT_KINDS)
    with pytest.raises(ValueError, match="unknown instruction kinds \\['shout'\\]"):
        make_tasks(5, seed=0, kinds=["max_words", "shout"])


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
    assert all(0.05 <= p.noise <= 0.15 and p.tie_margin == 0.3 for p in people)


def test_win_rate_and_following_count_what_they_should() -> None:
    tasks = make_tasks(60, seed=5)
    judges = population(0, 4, seed=2)
    obeying = ["- ok\n- fine" if "list" in t.prompt else "ok" for t in tasks]  # short, lowercase, one line
    rambling = ["Well, THE answer Is a long one, and it goes on. And on." for _ in tasks]
    better = win_rate(tasks, rambling, obeying, judges, seed=0)
    assert better["win_rate"] > 0.75 and better["low"] > 0.5 and better["prompts"] == 60 and better["judges"] == 4
    same = win_rate(tasks, obeying, obeying, judges, seed=0)  # only noise between them
    assert abs(same["win_rate"] - 0.5) < 0.08
    assert following(tasks, obeying)["max_words"] == 1.0 and following(tasks, rambling)["max_words"] == 0.0


def test_the_evaluation_speaks_through_callers_the_trainer_holds_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEED_TRAINER_HELDOUT_FRACTION", "0.9")  # the experiment's own settings win
    fraction = trainer_config({"HEED_TRAINER_HELDOUT_FRACTION": "0.3"}).heldout_fraction
    callers = eval_callers(16, fraction)

    assert fraction == 0.3 and len(set(callers)) == 16
    assert all(held_out(c, 0.3) for c in callers)
    assert not all(held_out(f"eval-{i}", 0.3) for i in range(16))  # the split is not everyone


@pytest.mark.parametrize(("kinds", "expected"), [(["lowercase", "uppercase"], 240), (["max_words", "lowercase"], 1200)])
def test_the_prompt_space_is_what_make_task_can_draw(kinds: list[str], expected: int) -> None:
    """Small spaces, drawn until every prompt was seen: the count matches prompt_space (the two
    kinds of the first conflict: no prompt carries both)."""
    assert prompt_space(kinds) == expected
    assert len({t.prompt for t in make_tasks(30 * expected, seed=1, kinds=kinds)}) == expected
    assert prompt_space(DEFAULT_KINDS) >= 10_000  # the app population's prompts never need to repeat


def test_an_apps_users_never_ask_a_prompt_twice_nor_an_evaluation_prompt() -> None:
    kinds = ["lowercase", "uppercase"]
    evaluation = {t.prompt for t in make_tasks(20, seed=9, kinds=kinds)}
    unique = UniqueTasks(lambda count, seed: make_tasks(count, seed, kinds), seed=1, exclude=evaluation, chunk=50)

    asked = [unique.next().prompt for _ in range(240 - len(evaluation))]

    assert len(set(asked)) == len(asked) and not set(asked) & evaluation
    with pytest.raises(RuntimeError, match="no prompt left"):
        unique.next()


def test_a_users_correction_follows_every_instruction_and_ratings_follow_utility() -> None:
    rng = random.Random(0)
    tasks = make_tasks(300, seed=5)
    for task in tasks:
        fix = write_answer(task, rng)
        assert fix is not None and all(task.followed(fix).values()), (task.prompt, fix)
    person = Labeler("p", "train", {}, noise=0.05)
    task = Task("Say it.", (include_word("blue"), max_words(5)))
    assert task.required_words() == ["blue"] and Task("Say it.", (max_words(5),)).required_words() == []
    assert person.rate(task, "blue sky", rng) >= 6 and person.rate(task, "grey sky all day long today", rng) <= 2


@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_results_say_whether_the_trainer_computed_in_bf16(
    setting: str, bf16_setting, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heed.simulate.experiment import trainer_computes_in_bf16, trainer_settings

    bf16_setting(setting)
    monkeypatch.setenv("HEED_TRAINER_DEVICE", "cpu")  # the trainer's device decides, not the machine's GPU
    settings = trainer_settings("labelers")
    assert trainer_computes_in_bf16(settings) is (setting == "1")
    assert trainer_config(settings).ppo.iterations == 12  # the same rounds on either host
    monkeypatch.setenv("HEED_TRAINER_PPO_ITERATIONS", "3")  # the environment has the last word
    assert trainer_config(trainer_settings("app")).ppo.iterations == 3


def test_an_undecided_canary_ends_within_the_runs_time_so_the_next_round_can_train(tmp_path) -> None:
    from heed.simulate.experiment import SimulateConfig, server_spec

    args = server_spec(SimulateConfig(out=tmp_path), {}).args
    assert args[args.index("--max-canary-hours") + 1] == "0.25"  # 15 minutes, not the server's day
    args = server_spec(SimulateConfig(out=tmp_path, max_canary_minutes=0), {}).args
    assert args[args.index("--max-canary-hours") + 1] == "0"  # 0: never, as the server takes it
