"""How the trainer judges a round before it publishes: the reward model's pairwise accuracy on
held-out callers' comparisons, the candidate policy's win rate against the stable one as judged
by the new reward model (the paper's headline metric, with the RM standing in for labelers), and
the gate that turns these into a decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from heed.stats import wilson_interval
from training import runtime
from training.config import TrainerConfig
from training.data import Prompt, empty_answers, pad, prompt_ids
from training.reward import Example, Heldout, encode_example, evaluate, load_reward_model
from training.sampling import HFSampler

log = logging.getLogger(__name__)


def _tokenizer(folder: Path) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def heldout_metrics(
    reward_model: Path, examples: list[Example], max_length: int, batch_size: int, device: str = "cpu"
) -> Heldout | None:
    """The held-out metrics of every kind (training.reward.Heldout) of a saved reward model on
    ``examples``, judged on ``device``; None when there are none."""
    if not examples:
        return None
    where = runtime.resolve_device(device)
    tokenizer, pad_id = _tokenizer(reward_model)
    model = load_reward_model(reward_model).to(where)
    groups = [encode_example(tokenizer, c, max_length) for c in examples]
    return evaluate(model, groups, pad_id, batch_size, runtime.use_bf16(None, where))


@torch.no_grad()
def _sample(
    policy_dir: Path,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    device: torch.device,
) -> list[list[int]]:
    policy = runtime.load_causal_lm(policy_dir, trainable=False).to(device)
    torch.manual_seed(seed)  # both policies sample with the same random stream
    return HFSampler(policy, pad_id, eos_id).generate(prompts, max_new_tokens, temperature)


@torch.no_grad()
def _scores(model: Any, prompts: list[list[int]], responses: list[list[int]], pad_id: int, max_length: int):
    sequences = [(p + r)[-max_length:] for p, r in zip(prompts, responses, strict=True)]
    scores = []
    device = runtime.model_device(model)
    for i in range(0, len(sequences), 8):
        ids, mask = pad(sequences[i : i + 8], pad_id)
        with runtime.autocast(runtime.use_bf16(None, device), device):
            scores.append(model.score(ids.to(device), mask.to(device)).float())
    return torch.cat(scores)


@dataclass(frozen=True)
class WinRate:
    """The candidate's answers against the baseline's, one each per prompt, judged by a reward model."""

    win_rate: float  # (wins + ties / 2) / prompts
    wins: int
    ties: int
    losses: int
    prompts: int
    candidate_reward: float  # mean score of the candidate's answers
    baseline_reward: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(
    candidate: Path,
    baseline: Path,
    reward_model: Path,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_prompt_length: int = 256,
    max_length: int = 512,
    device: str = "cpu",
) -> WinRate:
    """How often the reward model prefers the candidate's answer to the baseline's, one sampled
    answer each per prompt; a tie (the same answer, or the same score) counts half. An answer with
    no visible text loses to one with text whatever the reward model says (PPO's ``empty_last``)."""
    where = runtime.resolve_device(device)
    tokenizer, pad_id = _tokenizer(reward_model)
    ids = [prompt_ids(tokenizer, p)[-max_prompt_length:] for p in prompts]
    answers = {
        name: _sample(folder, ids, pad_id, tokenizer.eos_token_id, max_new_tokens, temperature, seed, where)
        for name, folder in (("candidate", candidate), ("baseline", baseline))
    }
    model = load_reward_model(reward_model).to(where)
    ours = _scores(model, ids, answers["candidate"], pad_id, max_length)
    theirs = _scores(model, ids, answers["baseline"], pad_id, max_length)
    empty = {name: empty_answers(tokenizer, a) for name, a in answers.items()}
    wins = ties = 0
    for i in range(len(ids)):
        mine, other = empty["candidate"][i], empty["baseline"][i]
        if mine or other:  # an empty answer loses to one with text; two empty ones tie
            ties, wins = ties + (mine and other), wins + (other and not mine)
        elif answers["candidate"][i] == answers["baseline"][i] or float(ours[i]) == float(theirs[i]):
            ties += 1
        elif ours[i] > theirs[i]:
            wins += 1
    n = len(ids)
    return WinRate(
        win_rate=(wins + 0.5 * ties) / max(n, 1),
        wins=wins,
        ties=ties,
        losses=n - wins - ties,
        prompts=n,
        candidate_reward=float(ours.mean()),
        baseline_reward=float(theirs.mean()),
    )


# ---- the gate ------------------------------------------------------------------------------------


CheckName = Literal[
    "rm_heldout_accuracy", "rm_thumbs_auc", "rm_thumbs_ece", "rm_ratings_spearman", "win_rate", "kl", "entropy_ratio"
]  # fmt: skip
RM_CHECKS = ("rm_heldout_accuracy", "rm_thumbs_auc", "rm_thumbs_ece", "rm_ratings_spearman")


@dataclass(frozen=True)
class Check:
    """One condition a candidate must meet to be published, with the numbers it was judged on."""

    name: CheckName
    value: float | None
    threshold: float
    passed: bool
    rule: str  # how value and threshold compare, e.g. ">= min_win_rate"
    bound: float | None = None  # what the rule judged, when not the value: its confidence bound

    def _value(self) -> str:
        value = "none" if self.value is None else f"{self.value:.4g}"
        return value if self.bound is None else f"{value} (upper bound {self.bound:.4g})"

    def __str__(self) -> str:
        return f"{self.name} {self._value()} {self.rule} {self.threshold:.4g}: {'passed' if self.passed else 'FAILED'}"

    def reason(self) -> str:
        return f"{self.name} {self._value()} is not {self.rule} {self.threshold:.4g}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gate(
    heldout: Heldout | None,
    previous: Heldout | None,
    win: float,
    kl: float,
    floors: TrainerConfig,
    entropy: tuple[float, float] | None = None,
) -> list[Check]:
    """The checks of a round: the reward model's (``rm_checks``), then the candidate's win rate
    >= ``min_win_rate``, KL <= ``max_kl`` and, given PPO's (first, last) per-token entropy, their
    ratio <= ``max_entropy_ratio``: a policy that PPO blew up into noise can score high on a
    reward model that never saw noise, and is caught here instead (seen: 2.97 -> 8.70 nats)."""
    checks = [
        *rm_checks(heldout, previous, floors),
        Check("win_rate", win, floors.min_win_rate, win >= floors.min_win_rate, ">= min_win_rate"),
        Check("kl", kl, floors.max_kl, kl <= floors.max_kl, "<= max_kl"),
    ]
    if entropy is not None and (entropy[0] > 0 or not math.isfinite(entropy[0])):
        ratio = entropy[1] / entropy[0] if all(map(math.isfinite, entropy)) else math.nan  # NaN: fails below
        checks.append(
            Check("entropy_ratio", ratio, floors.max_entropy_ratio, ratio <= floors.max_entropy_ratio,
                  "<= max_entropy_ratio")
        )  # fmt: skip
    return checks


def rm_checks(heldout: Heldout | None, previous: Heldout | None, floors: TrainerConfig) -> list[Check]:
    """The reward model's checks, on the kinds that have held-out data; ``floors``: the trainer's
    config (its rm_accuracy_margin, min_rm_accuracy, rm_accuracy_z, min_thumbs_auc, max_thumbs_ece,
    min_ratings_spearman, gate_min_examples).

    Ranking accuracy (when there are held-out comparisons, or nothing else to judge the reward
    model on): without a previous reward model the new one is held to chance (0.5) minus the
    margin, and always to ``min_rm_accuracy`` (missed when the accuracy's Wilson upper bound at
    ``rm_accuracy_z`` standard errors, over at least ``gate_min_examples`` comparisons, is under
    it: a floor judged on a few dozen comparisons fails a decent reward model by chance otherwise;
    the floors relative to chance and to the previous reward model, judged on the same
    comparisons, hold the accuracy itself); without any held-out
    data its accuracy cannot be known, and the check fails rather than waving a blind model
    through. Thumbs (AUC and the calibration of P(up)) and ratings (Spearman) are checked against
    their floors once the held-out set has ``gate_min_examples`` of them."""
    checks = []
    accuracy = heldout.accuracy if heldout else None
    judged_otherwise = heldout is not None and max(heldout.thumbs, heldout.ratings) >= floors.gate_min_examples
    if accuracy is not None or not judged_otherwise:
        previous_accuracy = previous.accuracy if previous else None
        floor = (0.5 if previous_accuracy is None else previous_accuracy) - floors.rm_accuracy_margin
        rule = ">= chance - margin" if previous_accuracy is None else ">= the previous RM's - margin"
        passed, bound = accuracy is not None and accuracy >= floor, None
        if floors.min_rm_accuracy > max(floor, 0.0) and (passed or accuracy is None):  # the higher floor
            floor, rule = floors.min_rm_accuracy, ">= min_rm_accuracy"
            # An absolute floor judged on a few dozen comparisons: missed when they show it (the
            # accuracy's upper bound under it), not when a decent RM's count falls short by chance.
            # n counts comparisons, not pairs (a ranking of 4 has 6, not independent): the wider
            # bound. Under gate_min_examples comparisons the bound is too wide to say anything
            # (at z 1, 0.5 on 10 reaches 0.65): the accuracy itself.
            n = heldout.comparisons if heldout is not None else 0  # 0 when accuracy is None
            if (
                accuracy is not None
                and floors.rm_accuracy_z > 0
                and n >= floors.gate_min_examples
                and (interval := wilson_interval(accuracy * n, n, floors.rm_accuracy_z))
            ):
                bound = max(accuracy, interval[1])  # never under it (1.0's bound rounds to 0.999...)
            passed = accuracy is not None and (accuracy if bound is None else bound) >= floor
        checks.append(Check("rm_heldout_accuracy", accuracy, floor, passed, rule, bound))
    if heldout is not None and heldout.thumbs >= floors.gate_min_examples:
        auc, ece = heldout.thumbs_auc, heldout.thumbs_ece
        checks.append(
            Check("rm_thumbs_auc", auc, floors.min_thumbs_auc, auc is not None and auc >= floors.min_thumbs_auc,
                  ">= min_thumbs_auc")
        )  # fmt: skip
        checks.append(
            Check("rm_thumbs_ece", ece, floors.max_thumbs_ece, ece is not None and ece <= floors.max_thumbs_ece,
                  "<= max_thumbs_ece")
        )  # fmt: skip
    if heldout is not None and heldout.ratings >= floors.gate_min_examples:
        rho, floor = heldout.ratings_spearman, floors.min_ratings_spearman
        checks.append(
            Check("rm_ratings_spearman", rho, floor, rho is not None and rho >= floor, ">= min_ratings_spearman")
        )
    return checks
