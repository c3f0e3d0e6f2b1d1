"""The reward model's losses for every signal, on plain tensors (no model): the direction each
one pushes the reward, ties, the thumbs' offset, the ratings' ordered cut points, the weights;
and the held-out metrics (AUC, calibration error, Spearman) against hand-computed values."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from training.reward import (
    FeedbackHead,
    Heldout,
    auc,
    calibrate_thumbs,
    example_losses,
    expected_calibration_error,
    feedback_loss,
    spearman,
)

WEIGHTS = {"ranking_weight": 1.0, "thumb_weight": 1.0, "rating_weight": 1.0, "correction_weight": 1.0}


def gradient(raw: list[float], labels, head: FeedbackHead | None = None, weights=WEIGHTS) -> list[float]:
    r = torch.tensor(raw, requires_grad=True)
    feedback_loss(r, labels, head or FeedbackHead(), weights).backward()
    assert r.grad is not None
    return r.grad.tolist()


def test_a_thumb_up_pushes_its_reward_up_and_a_thumb_down_pushes_it_down() -> None:
    up, down = gradient([0.3, 0.3], [("thumb", (1,)), ("thumb", (-1,))])
    assert up < 0 < down  # gradient descent: the up-voted answer's reward rises, the other's falls


def test_the_thumbs_offset_is_where_p_up_is_one_half_and_it_learns_the_base_rate() -> None:
    head = FeedbackHead()
    with torch.no_grad():
        head.thumb_bias.fill_(1.5)
    assert float(head.p_up(torch.tensor(1.5)).detach()) == pytest.approx(0.5)
    up_loss, down_loss = example_losses(torch.tensor([1.5, 1.5]), [("thumb", (1,)), ("thumb", (-1,))], head).detach()
    assert float(up_loss) == pytest.approx(float(down_loss)) == pytest.approx(math.log(2))
    # Three ups to one down at the same reward: the offset moves below it (P(up) rises towards 3/4).
    labels = [("thumb", (1,))] * 3 + [("thumb", (-1,))]
    feedback_loss(torch.full((4,), 1.5), labels, head, WEIGHTS).backward()
    assert head.thumb_bias.grad is not None and float(head.thumb_bias.grad) > 0


def test_a_higher_rating_pulls_the_reward_up_and_a_low_one_down() -> None:
    low, middle, high = gradient([0.0, 0.0, 0.0], [("rated", (1,)), ("rated", (4,)), ("rated", (7,))])
    assert high < 0 < low
    assert abs(middle) < abs(high)  # 4 sits in the middle of the initial cut points: little pull


def test_the_ratings_cut_points_stay_ordered_and_their_probabilities_sum_to_one() -> None:
    head = FeedbackHead()
    with torch.no_grad():
        head.gaps.copy_(torch.tensor([-5.0, 3.0, -2.0, 0.0, 8.0]))  # any values: the cut points rise
    cuts = head.cuts()
    assert torch.all(cuts[1:] > cuts[:-1])
    probs = head.rating_probs(torch.tensor([-10.0, 0.0, 10.0]))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    assert int(probs[0].argmax()) == 0 and int(probs[2].argmax()) == 6  # low reward: 1; high: 7


def test_comparisons_rank_and_tied_answers_make_no_pair() -> None:
    better, worse = gradient([0.0, 0.0], [("ranking", (0, 1))])
    assert better < 0 < worse
    tied = gradient([0.0, 0.0, 0.0], [("rating", (0, 0, 1))])  # two tied answers above a third
    assert tied[0] == pytest.approx(tied[1]) and tied[0] < 0 < tied[2]
    fix, original = gradient([0.0, 0.0], [("correction", (0, 1))])
    assert fix < 0 < original


def test_each_kind_takes_its_weight() -> None:
    labels = [("thumb", (1,)), ("ranking", (0, 1))]
    base = gradient([0.0, 0.2, 0.1], labels)
    doubled = gradient([0.0, 0.2, 0.1], labels, weights={**WEIGHTS, "thumb_weight": 2.0})
    ignored = gradient([0.0, 0.2, 0.1], labels, weights={**WEIGHTS, "thumb_weight": 0.0})
    assert doubled[0] == pytest.approx(2 * base[0]) and doubled[1:] == pytest.approx(base[1:])
    assert ignored[0] == 0.0 and ignored[1:] == pytest.approx(base[1:])


def test_the_feedback_head_always_takes_part_in_the_graph() -> None:
    """A batch of rankings only still gives the head's parameters a (zero) gradient, so every rank
    of a distributed run all-reduces the same parameters."""
    head = FeedbackHead()
    feedback_loss(torch.tensor([1.0, 0.0], requires_grad=True), [("ranking", (0, 1))], head, WEIGHTS).backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in head.parameters())


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auc([0.1, 0.8, 0.9], [True, True, False]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.3, 0.1, 0.2, 0.4], [True, False, True, False]) == 0.5  # (1 + 1 + 0 + 0) / 4
    assert auc([0.3, 0.4], [True, True]) is None
    assert auc([float("nan"), 0.4], [True, False]) is None  # a diverged reward model


def test_the_calibration_error_of_probabilities() -> None:
    assert expected_calibration_error([0.25] * 4, [True, False, False, False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 2, [False, False]) == pytest.approx(0.9)
    # Two bins: (0.15 vs 0 up) weighted 1/2, (0.85 vs 1 up) weighted 1/2.
    assert expected_calibration_error([0.15, 0.85], [False, True]) == pytest.approx(0.15)
    assert expected_calibration_error([], []) is None
    assert expected_calibration_error([float("nan"), 0.5], [True, False]) is None  # was a crash: int(nan)


def test_spearman_with_ties_and_constant_sides() -> None:
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 5.0, 7.0]) == pytest.approx(1.0)
    assert spearman([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 5.0, 7.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None
    assert spearman([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]) == pytest.approx(2 / math.sqrt(5))


def test_the_gate_rejects_a_policy_whose_entropy_blew_up() -> None:
    from training.config import TrainerConfig
    from training.evaluate import gate

    cfg = TrainerConfig()
    heldout = Heldout(accuracy=0.9, loss=0.3, comparisons=64)
    collapsed = {c.name: c for c in gate(heldout, None, 0.92, 5.0, cfg, (2.97, 8.70))}  # seen in a CI run
    assert not collapsed["entropy_ratio"].passed and collapsed["entropy_ratio"].value == pytest.approx(2.93, abs=0.01)
    healthy = {c.name: c for c in gate(heldout, None, 0.92, 5.0, cfg, (2.81, 3.75))}  # a 135M round
    assert all(c.passed for c in healthy.values())
    nan = float("nan")
    # a policy whose entropy is not a (finite) number is not waved through
    for entropy in ((nan, 3.0), (2.9, nan), (math.inf, 3.0), (2.9, math.inf)):
        assert not {c.name: c for c in gate(heldout, None, 0.92, 5.0, cfg, entropy)}["entropy_ratio"].passed
    assert "entropy_ratio" not in {c.name for c in gate(heldout, None, 0.92, 5.0, cfg)}  # no PPO figures: no check


def test_gradients_accumulated_over_micro_batches_stay_each_parameters_own() -> None:
    """Gradient accumulation over a batch of one ranking, then one of thumbs: the rating cut
    points get no gradient, and the thumbs' offset gets the thumbs' alone. (Through one sum,
    autograd handed the feedback head's scalars one shared zero gradient, and the thumbs' batch
    then accumulated into it in place: the first cut point took the offset's gradient, and Adam
    moved it with no rating in sight.)"""
    from training.reward import FeedbackHead, feedback_loss

    weights = {"ranking_weight": 1.0, "thumb_weight": 1.0, "rating_weight": 1.0, "correction_weight": 1.0}
    ranking = (torch.tensor([0.5, -0.5], requires_grad=True), [("ranking", (0, 1))])
    thumbs = (torch.tensor([0.3, -1.2]), [("thumb", (1,)), ("thumb", (-1,))])
    alone = FeedbackHead()
    feedback_loss(*thumbs, alone, weights).backward()  # type: ignore[arg-type]
    head = FeedbackHead()
    for raw, labels in (ranking, thumbs):  # accumulated, as a step with --grad-accum 2 does
        feedback_loss(raw, labels, head, weights).backward()  # type: ignore[arg-type]

    assert float(head.thumb_bias.grad) == float(alone.thumb_bias.grad) != 0.0
    assert float(head.first_cut.grad) == 0.0 and not head.gaps.grad.any()


class FirstTokenScores(torch.nn.Module):
    """Stands in for a reward model in the calibration's test (not about the model): a sequence's
    score is its first token / 10, less the model's offset, as a reward model's is."""

    def __init__(self) -> None:
        super().__init__()
        self.feedback = FeedbackHead()
        self.register_buffer("offset", torch.tensor(1.0))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ids[:, 0].float() / 10 - self.offset


def thumbs_drawn(n: int, seed: int, bias: float = 2.0, scale: float = 2.0) -> list:
    """Thumbs on answers whose raw reward is token / 10, up with P = sigmoid(scale (r - bias))."""
    rng = random.Random(seed)
    tokens = [rng.randrange(0, 41) for _ in range(n)]
    up = [rng.random() < 1 / (1 + math.exp(-scale * (t / 10 - bias))) for t in tokens]
    return [([[t, 1]], ("thumb", (1 if u else -1,))) for t, u in zip(tokens, up, strict=True)]


def test_p_up_is_fitted_to_the_training_thumbs_and_calibrates_on_new_ones() -> None:
    """The reward ranks the thumbs, but its link is off (bias 0, slope 1 where the truth is 2 and
    2): the fit finds the truth from the raw reward (the offset added back), and P(up) on thumbs it
    did not see is calibrated; comparisons among the examples take no part."""
    model = FirstTokenScores()
    train = [*thumbs_drawn(600, seed=1), ([[5, 1], [3, 1]], ("ranking", (0, 1)))]
    fresh = thumbs_drawn(600, seed=2)
    raw = torch.tensor([g[0][0][0] / 10 for g in fresh])
    up = [g[1][1][0] > 0 for g in fresh]
    before = expected_calibration_error(model.feedback.p_up(raw).tolist(), up)

    assert calibrate_thumbs(model, train, pad_id=0, batch_size=64, bf16=False, seed=0)

    assert float(model.feedback.thumb_bias.detach()) == pytest.approx(2.0, abs=0.25)
    assert float(model.feedback.thumb_scale) == pytest.approx(2.0, rel=0.3)
    after = expected_calibration_error(model.feedback.p_up(raw).tolist(), up)
    assert before is not None and after is not None and before > 0.25 and after < 0.06


def test_p_up_keeps_its_link_with_too_few_thumbs_or_thumbs_of_one_kind() -> None:
    model = FirstTokenScores()
    few, all_up = thumbs_drawn(15, seed=3), [(a, ("thumb", (1,))) for a, _ in thumbs_drawn(100, seed=4)]
    for groups in (few, all_up):
        assert not calibrate_thumbs(model, groups, pad_id=0, batch_size=64, bf16=False, seed=0)
        assert float(model.feedback.thumb_bias.detach()) == 0.0 and float(model.feedback.thumb_scale) == 1.0


def test_a_head_saved_before_p_up_had_a_slope_loads_with_a_slope_of_1() -> None:
    """Reward models and checkpoints saved before the fit have no thumb_scale: they load as trained."""
    old = FeedbackHead()
    with torch.no_grad():
        old.thumb_bias.fill_(0.7)
    saved = {k: v for k, v in old.state_dict().items() if k != "thumb_scale"}
    head = FeedbackHead()
    head.thumb_scale.fill_(3.0)
    head.load_state_dict(saved)
    assert float(head.thumb_scale) == 1.0 and float(head.thumb_bias.detach()) == pytest.approx(0.7)
    model = torch.nn.Module()
    model.feedback = FeedbackHead()
    model.load_state_dict({f"feedback.{k}": v for k, v in saved.items()})  # as inside a whole model's state
    assert float(model.feedback.thumb_scale) == 1.0


def test_the_accuracy_floor_allows_for_the_held_out_counts_noise() -> None:
    """--min-rm-accuracy is missed when the held-out comparisons show the reward model is under it
    (the accuracy's Wilson upper bound at --rm-accuracy-z standard errors), not when a decent one
    falls short on a few dozen by chance; the floors relative to chance and the previous reward
    model still hold the accuracy itself."""
    from training.config import TrainerConfig
    from training.evaluate import rm_checks

    cfg = TrainerConfig(min_rm_accuracy=0.65)

    def check(accuracy: float, n: int, previous: float | None = None, **overrides: float):  # type: ignore[no-untyped-def]
        before = None if previous is None else Heldout(accuracy=previous, loss=0.6, comparisons=n)
        (only,) = rm_checks(Heldout(accuracy=accuracy, loss=0.6, comparisons=n), before, replace(cfg, **overrides))
        return only

    first_round = check(0.6186, 34)  # a run's round 1: thumbs AUC 0.85, rejected at the floor as it was
    assert first_round.passed and first_round.bound == pytest.approx(0.6974, abs=1e-4)
    assert "0.6186 (upper bound 0.6974) >= min_rm_accuracy 0.65: passed" in str(first_round)
    assert not check(0.6186, 34, rm_accuracy_z=0).passed and check(0.6186, 34, rm_accuracy_z=0).bound is None
    assert not check(0.55, 34).passed  # 34 comparisons do show this one under the floor
    assert not check(0.6186, 400).passed  # and 400 show this one
    assert check(0.70, 34).passed
    # Against a previous reward model on the same comparisons: the accuracy itself.
    worse = check(0.62, 34, previous=0.68)  # 0.63 for the previous less the margin
    assert (worse.rule, worse.passed, worse.bound) == (">= the previous RM's - margin", False, None)
    assert check(0.64, 34, previous=0.68).passed  # over that, and not shown under 0.65
    assert not check(0.55, 34, previous=0.58).passed  # over 0.53, shown under 0.65
    assert not check(0.6186, 34, min_rm_accuracy=1.01).passed  # no bound reaches a floor over 1
    assert check(1.0, 30, min_rm_accuracy=1.0).passed  # whose bound rounds to 0.9999...
    # Under --gate-min-examples comparisons the bound says nothing: a coin flip's on 10 is 0.651.
    assert not check(0.5, 10).passed and check(0.5, 10).bound is None
    assert check(0.5, 10, gate_min_examples=10).passed
