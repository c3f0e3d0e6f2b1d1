"""The reward model: the SFT policy's backbone with its unembedding replaced by a scalar head,
trained on every signal apps send, then offset so demonstrations score 0.

    config (training.config.RMConfig) -> data (comparisons, thumbs, ratings) -> model
    (RewardModel, with its FeedbackHead) -> loss (feedback_loss) -> loop (one epoch, held-out
    metrics per kind) -> bias -> save OUT/model (a loadable folder) -> the result (the folder,
    the held-out metrics, every step's metrics).

One scalar reward r(x, y) is trained jointly on:
  - comparisons (a labeler's K-way ranking, two thumbs or two ratings of one prompt's answers, a
    correction over the model's answer): the paper's loss, -mean_{i above j} log sigmoid(r_i - r_j);
  - unpaired thumbs: a pointwise logistic loss, P(up) = sigmoid(r - b) with a learned offset b
    (after training, b and a slope a are fitted to the training thumbs: P(up) = sigmoid(a (r - b)));
  - 1-7 ratings: an ordinal (cumulative-link) loss, P(rating <= k) = sigmoid(c_k - r) with six
    learned, ordered cut points c_1 < ... < c_6.
Each example's loss is weighted by its kind (RMConfig.*_weight). b and the cut points live in
the ``FeedbackHead`` and read the head's raw output (before the normalising offset), so moving
the offset does not move P(up) or the ratings' probabilities.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from heed.datadir import atomic_folder
from training import runtime, threads
from training.config import RMConfig
from training.data import (
    RATINGS,
    Comparison,
    ComparisonKind,
    Demonstration,
    Judged,
    Prompt,
    Rated,
    pad,
    prompt_ids,
    response_ids,
    seeded_sample,
)
from training.metrics import MetricsWriter, StepMetrics

log = logging.getLogger(__name__)
HEAD_FILE = "reward_head.pt"
# P(up)'s fit after training (calibrate_thumbs): on a sample of this many thumbs at most, and only
# with this many at least.
CALIBRATION_THUMBS = 1024
MIN_CALIBRATION_THUMBS = 16


# What the reward model trains on: comparisons (of any kind), thumbs and ratings.
Example = Comparison | Judged | Rated


@dataclass(frozen=True)
class Heldout:
    """A reward model judged on held-out examples, per kind (None: no data of that kind, or too
    little to measure):
    - ``accuracy``: the share of pairs it orders as people did (rankings, thumb and rating
      pairs; a tie counts half), over ``comparisons`` comparisons;
    - ``correction_accuracy``: the same over ``corrections`` (corrected text over the model's answer);
    - ``thumbs_auc``: the probability that an up-voted answer scores above a down-voted one;
      ``thumbs_ece``: the expected calibration error of P(up) (10 equal bins), over ``thumbs``;
    - ``ratings_spearman``: the rank correlation of reward and rating, over ``ratings``;
    - ``loss``: the joint loss (unweighted mean over the examples)."""

    accuracy: float | None
    loss: float
    comparisons: int
    correction_accuracy: float | None = None
    corrections: int = 0
    thumbs_auc: float | None = None
    thumbs_ece: float | None = None
    thumbs: int = 0
    ratings_spearman: float | None = None
    ratings: int = 0


@dataclass(frozen=True)
class RMStep(StepMetrics):
    """One optimizer step: the training batch's loss and pairwise accuracy (None: no comparison
    in the batch), and the held-out ones at an evaluation step."""

    loss: float
    accuracy: float | None
    valid_loss: float | None = None
    valid_accuracy: float | None = None
    valid_thumbs_auc: float | None = None
    valid_ratings_spearman: float | None = None


@dataclass(frozen=True)
class RMResult:
    """The saved reward model, its last held-out evaluation (None without held-out comparisons),
    its offset, and the metrics of the steps this call ran (a resumed run: those after its
    checkpoint)."""

    model: Path
    heldout: Heldout | None
    offset: float
    steps: list[RMStep]


# ---- model ---------------------------------------------------------------------------------------


class FeedbackHead(torch.nn.Module):
    """The reward's link to unpaired feedback, on the raw reward r (the head's output):
    P(up | r) = sigmoid(thumb_scale * (r - thumb_bias)); P(rating <= k | r) = sigmoid(c_k - r) for
    k = 1..6, with c_1 = first_cut and each next cut point a softplus(gap) above the last (so they
    stay ordered). ``thumb_scale`` is no parameter: training holds it at 1 (the thumbs train the
    reward on the comparisons' scale, as Bradley-Terry's), then ``calibrate_thumbs`` fits it."""

    thumb_scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.thumb_bias = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("thumb_scale", torch.ones(()))
        self.first_cut = torch.nn.Parameter(torch.tensor(-2.5))
        # softplus(log(e - 1)) = 1: the cut points start one apart, -2.5 ... 2.5
        self.gaps = torch.nn.Parameter(torch.full((len(RATINGS) - 2,), math.log(math.e - 1)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A head (or a checkpoint) saved before P(up) had a fitted slope has none: 1, as it was trained.
        state_dict.setdefault(prefix + "thumb_scale", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def cuts(self) -> torch.Tensor:
        return torch.cat(
            [self.first_cut[None], self.first_cut + torch.cumsum(torch.nn.functional.softplus(self.gaps), 0)]
        )

    def p_up(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.thumb_scale * (raw - self.thumb_bias))

    def thumb_loss(self, raw: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """-log P(the thumb given) per answer; ``up``: bool per answer."""
        sign = up.to(raw.dtype) * 2 - 1
        return -torch.nn.functional.logsigmoid(sign * self.thumb_scale * (raw - self.thumb_bias))

    def rating_probs(self, raw: torch.Tensor) -> torch.Tensor:
        """P(rating = k | r) for k = 1..7: shape (N, 7)."""
        below = torch.sigmoid(self.cuts()[None, :] - raw[:, None])  # P(rating <= k), k = 1..6
        ones, zeros = torch.ones_like(raw)[:, None], torch.zeros_like(raw)[:, None]
        cumulative = torch.cat([zeros, below, ones], dim=1)
        return cumulative[:, 1:] - cumulative[:, :-1]

    def rating_loss(self, raw: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
        """-log P(the rating given) per answer; ``rating``: 1..7 per answer."""
        p = self.rating_probs(raw).gather(1, (rating - RATINGS.start)[:, None]).squeeze(1)
        return -torch.log(p.clamp_min(1e-8))


def keep_layers(body: Any, n: int) -> None:
    """Cut a decoder body (``body.layers``, a Llama-style model) to its first ``n`` transformer
    layers, its config with it, so that it saves and loads as an ``n``-layer model."""
    if not isinstance(getattr(body, "layers", None), torch.nn.ModuleList):
        raise ValueError(f"cannot keep {n} layers of a {type(body).__name__}: it has no list of layers")
    body.layers = body.layers[:n]
    body.config.num_hidden_layers = n
    if isinstance(getattr(body.config, "layer_types", None), list):
        body.config.layer_types = body.config.layer_types[:n]


class RewardModel(torch.nn.Module):
    """r(x, y): the transformer body and a linear head read at the last token of the answer.

    ``values`` gives the head at every position (the PPO value function starts from this);
    ``score`` reads it at each sequence's last real token and adds the normalising ``bias``."""

    offset: torch.Tensor  # a buffer: saved with the head, subtracted from every value

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / (backbone.config.hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(self.head.bias)
        self.feedback = FeedbackHead()
        self.register_buffer("offset", torch.zeros(()))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1) - self.offset

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per right-padded sequence: the value at its last real token."""
        last = attention_mask.sum(dim=1) - 1
        return self.values(input_ids, attention_mask)[torch.arange(len(last), device=last.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False):
        """``score`` (or, with ``per_token``, ``values``): DistributedDataParallel calls this."""
        return self.values(input_ids, attention_mask) if per_token else self.score(input_ids, attention_mask)

    @classmethod
    def from_causal_lm(cls, folder: Path | str, dtype: torch.dtype = torch.float32, layers: int = 0) -> RewardModel:
        """A new reward model on a policy's body (its unembedding dropped), head untrained; with
        ``layers``, on the body's first ``layers`` transformer layers alone (the final norm kept)."""
        from transformers import AutoModel

        body = AutoModel.from_pretrained(str(folder), dtype=dtype)
        if 0 < layers < body.config.num_hidden_layers:
            keep_layers(body, layers)
        return cls(threads.watch(body))

    @classmethod
    def from_pretrained(cls, folder: Path | str, dtype: torch.dtype = torch.float32) -> RewardModel:
        """Load what ``save_pretrained`` wrote."""
        model = cls.from_causal_lm(folder, dtype)
        head = torch.load(Path(folder) / HEAD_FILE, weights_only=True, map_location="cpu")
        model.head.load_state_dict(head["head"])
        if "feedback" in head:  # a reward model trained on rankings only has none
            model.feedback.load_state_dict(head["feedback"])
        model.offset.fill_(head["offset"])
        return model

    def save_pretrained(self, folder: Path) -> None:
        """The backbone as a Hugging Face folder, plus the head and its offset beside it."""
        self.backbone.save_pretrained(folder)
        head = {"head": self.head.state_dict(), "feedback": self.feedback.state_dict(), "offset": float(self.offset)}
        torch.save(head, folder / HEAD_FILE)
        (folder / "reward_model.json").write_text(json.dumps({"head": HEAD_FILE, "offset": float(self.offset)}))


def load_reward_model(folder: Path | str, trainable: bool = False, bf16: bool = False) -> RewardModel:
    model = RewardModel.from_pretrained(folder, torch.bfloat16 if bf16 and not trainable else torch.float32)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


# ---- data ----------------------------------------------------------------------------------------


def encode_answers(tokenizer: Any, prompt: Prompt, answers: tuple[str, ...], max_length: int) -> list[list[int]]:
    p = prompt_ids(tokenizer, prompt)
    return [(p + response_ids(tokenizer, a))[-max_length:] for a in answers]


# What an example says about its answers: a comparison's kind and ranks (0 = best; equal: tied),
# a thumb's ("thumb", (1,) up or (-1,) down), a rating's ("rated", (1..7,)).
LabelKind = ComparisonKind | Literal["thumb", "rated"]
Label = tuple[LabelKind, tuple[int, ...]]
# One example's answers (a comparison's best first; a thumb's or rating's one) and its label.
Group = tuple[list[list[int]], Label]


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Group:
    if isinstance(example, Comparison):
        answers = encode_answers(tokenizer, example.prompt, example.responses, max_length)
        return answers, (example.kind, example.rank_list())
    answer = encode_answers(tokenizer, example.prompt, (example.response,), max_length)
    if isinstance(example, Judged):
        return answer, ("thumb", (1 if example.desirable else -1,))
    return answer, ("rated", (example.rating,))


def collate(groups: list[Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[Label]]:
    """All answers of all examples in one right-padded batch, and each example's label."""
    ids, mask = pad([seq for g, _ in groups for seq in g], pad_id)
    return ids, mask, [label for _, label in groups]


# ---- loss ----------------------------------------------------------------------------------------


Ranks = Sequence[int | tuple[int, ...]]


def _pairs(ranks: int | tuple[int, ...]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(K, better, worse): the index pairs i < j of a prompt's answers where i is ranked above j
    (``ranks`` is K itself when all K answers have their own rank; tied answers make no pair)."""
    k = ranks if isinstance(ranks, int) else len(ranks)
    better, worse = torch.triu_indices(k, k, offset=1)
    if not isinstance(ranks, int):
        r = torch.tensor(ranks)
        strict = r[better] < r[worse]
        better, worse = better[strict], worse[strict]
    return k, better, worse


def kway_loss(rewards: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The paper's loss: for each prompt with K ranked answers (best first),
    -1/C(K,2) * sum_{i<j} log sigmoid(r_i - r_j); averaged over prompts. Tied answers form no
    pair, and the mean is over the pairs that remain.

    ``rewards`` holds the K_1 + K_2 + ... scores of the batch's answers, prompt after prompt:
    each answer goes through the model once, and every pair of a prompt is one batch element.
    ``ranks``: each prompt's K, or its ranks (0 = best; equal = tied)."""
    losses, start = [], 0
    for item in ranks:
        k, better, worse = _pairs(item)
        r = rewards[start : start + k]
        start += k
        losses.append(-torch.nn.functional.logsigmoid(r[better] - r[worse]).mean())
    return torch.stack(losses).mean()


def pairwise_accuracy(rewards: torch.Tensor, ranks: Ranks) -> tuple[float, int]:
    """(pairs ordered as the labelers ranked them, pairs) over the batch. A pair the model
    scores equal (a collapsed model, or bf16 rounding) counts half: it is a coin flip, not a
    wrong answer."""
    right, total, start = 0.0, 0, 0
    for item in ranks:
        k, better, worse = _pairs(item)
        r = rewards[start : start + k]
        start += k
        right += float((r[better] > r[worse]).sum()) + 0.5 * float((r[better] == r[worse]).sum())
        total += len(better)
    return right, total


# Which weight (an RMConfig field) an example's loss takes, by its label's kind.
WEIGHT_OF: dict[LabelKind, str] = {
    "ranking": "ranking_weight",
    "thumbs": "thumb_weight",
    "thumb": "thumb_weight",
    "rating": "rating_weight",
    "rated": "rating_weight",
    "correction": "correction_weight",
}


def _answers(label: Label) -> int:
    """How many answers an example with this label has."""
    kind, values = label
    return 1 if kind in ("thumb", "rated") else len(values)


def example_losses(raw: torch.Tensor, labels: Sequence[Label], feedback: FeedbackHead) -> torch.Tensor:
    """Each example's loss: a comparison's K-way loss (over its untied pairs), a thumb's
    pointwise logistic loss, a rating's ordinal loss. ``raw``: the raw rewards (before the
    normalising offset) of the batch's answers, example after example."""
    starts = list(
        itertools.accumulate(
            (len(values) if kind not in ("thumb", "rated") else 1 for kind, values in labels), initial=0
        )
    )
    out: list[torch.Tensor | None] = [None] * len(labels)
    thumbs = [i for i, (kind, _) in enumerate(labels) if kind == "thumb"]
    rated = [i for i, (kind, _) in enumerate(labels) if kind == "rated"]
    if thumbs:
        up = torch.tensor([labels[i][1][0] > 0 for i in thumbs], device=raw.device)
        for i, loss in zip(thumbs, feedback.thumb_loss(raw[[starts[i] for i in thumbs]], up), strict=True):
            out[i] = loss
    if rated:
        ratings = torch.tensor([labels[i][1][0] for i in rated], device=raw.device)
        for i, loss in zip(rated, feedback.rating_loss(raw[[starts[i] for i in rated]], ratings), strict=True):
            out[i] = loss
    for i, (kind, ranks) in enumerate(labels):
        if kind not in ("thumb", "rated"):
            _, better, worse = _pairs(ranks)
            r = raw[starts[i] : starts[i + 1]]
            out[i] = -torch.nn.functional.logsigmoid(r[better] - r[worse]).mean()
    return torch.stack([loss for loss in out if loss is not None])


def feedback_loss(
    raw: torch.Tensor, labels: Sequence[Label], feedback: FeedbackHead, weights: Mapping[str, float]
) -> torch.Tensor:
    """The joint loss of a batch: sum over examples of weight(kind) * loss, over the examples.
    ``weights``: RMConfig's ``*_weight`` fields by name (WEIGHT_OF). The feedback head's
    parameters always take part (at zero weight when the batch has no thumb or rating), so a
    distributed run all-reduces the same parameters on every rank."""
    losses = example_losses(raw, labels, feedback)
    w = torch.tensor([weights[WEIGHT_OF[kind]] for kind, _ in labels], dtype=losses.dtype, device=losses.device)
    # Each parameter its own zero gradient: through one sum, autograd hands every parameter the same
    # gradient tensor, which a later micro-batch then accumulates into in place, for all of them.
    keep_in_graph = sum((0.0 * p).sum() for p in feedback.parameters())
    return (losses * w).sum() / len(labels) + keep_in_graph


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """P(a positive scores above a negative), ties half (Mann-Whitney); None without both classes
    or with a score that is not a number (a diverged reward model is not judged good)."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0 or not all(math.isfinite(s) for s in scores):
        return None
    ranks = _ranks(scores)
    return (sum(r for r, p in zip(ranks, positive, strict=True) if p) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expected_calibration_error(probs: Sequence[float], positive: Sequence[bool], bins: int = 10) -> float | None:
    """Sum over equal-width bins of P of (share of answers in the bin) * |mean P - share positive|;
    None without probabilities, or with one that is not a number."""
    if not probs or not all(math.isfinite(p) for p in probs):
        return None
    total = 0.0
    for b in range(bins):
        inside = [(p, y) for p, y in zip(probs, positive, strict=True) if min(int(p * bins), bins - 1) == b]
        if inside:
            mean_p = sum(p for p, _ in inside) / len(inside)
            share = sum(y for _, y in inside) / len(inside)
            total += len(inside) / len(probs) * abs(mean_p - share)
    return total


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """The rank correlation (ties: mean ranks); None when either side is constant, too short or
    not all numbers."""
    if len(x) < 3 or not all(math.isfinite(v) for v in (*x, *y)):
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


@torch.no_grad()
def evaluate(model: RewardModel, groups: list[Group], pad_id: int, batch_size: int, bf16: bool) -> Heldout:
    """The metrics of every kind on ``groups`` (encoded held-out examples), on the model's device."""
    device = runtime.model_device(model)
    model.eval()
    right, total, fixed_right, fixed_total = 0.0, 0, 0.0, 0
    comparisons = corrections = 0
    loss_sum = 0.0
    thumbs: list[tuple[float, float, bool]] = []  # (raw, P(up), up)
    ratings: list[tuple[float, int]] = []
    for i in range(0, len(groups), batch_size):
        ids, mask, labels = collate(groups[i : i + batch_size], pad_id)
        with runtime.autocast(bf16, device):  # forward, not score: a sharded model's hooks are on forward
            raw = model(ids.to(device), mask.to(device)).float() + model.offset
        loss_sum += float(example_losses(raw, labels, model.feedback).sum())
        start = 0
        for kind, values in labels:
            if kind == "thumb":
                thumbs.append((float(raw[start]), float(model.feedback.p_up(raw[start])), values[0] > 0))
                start += 1
            elif kind == "rated":
                ratings.append((float(raw[start]), values[0]))
                start += 1
            else:
                r, t = pairwise_accuracy(raw[start : start + len(values)], [values])
                start += len(values)
                if kind == "correction":
                    fixed_right, fixed_total, corrections = fixed_right + r, fixed_total + t, corrections + 1
                else:
                    right, total, comparisons = right + r, total + t, comparisons + 1
    model.train()
    return Heldout(
        accuracy=right / total if total else None,
        loss=loss_sum / max(len(groups), 1),
        comparisons=comparisons,
        correction_accuracy=fixed_right / fixed_total if fixed_total else None,
        corrections=corrections,
        thumbs_auc=auc([s for s, _, _ in thumbs], [u for _, _, u in thumbs]),
        thumbs_ece=expected_calibration_error([p for _, p, _ in thumbs], [u for _, _, u in thumbs]),
        thumbs=len(thumbs),
        ratings_spearman=spearman([s for s, _ in ratings], [float(r) for _, r in ratings]),
        ratings=len(ratings),
    )


@torch.no_grad()
def scores(model: RewardModel, sequences: list[list[int]], pad_id: int, batch_size: int, bf16: bool) -> torch.Tensor:
    """The model's score (after its offset) of each sequence, on the CPU; the model is left in
    eval mode."""
    device = runtime.model_device(model)
    model.eval()
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = pad(sequences[i : i + batch_size], pad_id)
        with runtime.autocast(bf16, device):
            out.append(model(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def mean_score(model: RewardModel, sequences: list[list[int]], pad_id: int, batch_size: int, bf16: bool) -> float:
    return float(scores(model, sequences, pad_id, batch_size, bf16).mean())


def calibrate_thumbs(
    model: RewardModel, groups: Sequence[Group], pad_id: int, batch_size: int, bf16: bool, seed: int
) -> bool:
    """Fit P(up)'s bias and slope to the thumbs among ``groups`` (a seeded sample of
    ``CALIBRATION_THUMBS`` at most), by maximum likelihood on Platt's smoothed targets (Platt 1999:
    (ups + 1) / (ups + 2) for an up-vote, 1 / (downs + 2) for a down-vote, so that thumbs the
    reward separates perfectly do not send the slope to infinity); returns whether it did (at
    least ``MIN_CALIBRATION_THUMBS`` thumbs, of both kinds). The reward model's scale comes from
    the comparisons (one pass over a round's sample leaves it narrow), and the bias, trained by
    steps, may not have reached the thumbs' share: in one run's first round P(up) averaged 0.18
    on training thumbs 32% up, its held-out ECE was 0.34 (AUC 0.99), and the gate rejected the
    round; that reward model retrained from the run's log and fitted, 0.20. Every process of a
    torchrun job fits the same thumbs to the same values."""
    thumbs = [(answers[0], values[0] > 0) for answers, (kind, values) in groups if kind == "thumb"]
    thumbs = seeded_sample(thumbs, CALIBRATION_THUMBS, seed)
    ups = sum(up for _, up in thumbs)
    if len(thumbs) < MIN_CALIBRATION_THUMBS or ups in (0, len(thumbs)):
        return False
    raw = scores(model, [seq for seq, _ in thumbs], pad_id, batch_size, bf16).double() + float(model.offset)
    high, low = (ups + 1) / (ups + 2), 1 / (len(thumbs) - ups + 2)
    target = torch.tensor([high if up else low for _, up in thumbs], dtype=torch.float64)
    bias = torch.tensor(float(model.feedback.thumb_bias.detach()), dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias, log_scale], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(log_scale.exp() * (raw - bias), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    fitted_bias, fitted_scale = float(bias.detach()), math.exp(float(log_scale.detach()))
    if not (math.isfinite(fitted_bias) and math.isfinite(fitted_scale)):
        return False
    with torch.no_grad():
        model.feedback.thumb_bias.fill_(fitted_bias)
        model.feedback.thumb_scale.fill_(fitted_scale)
    log.info("P(up) fitted to %d training thumbs: sigmoid(%.3f (r - %.3f))", len(thumbs), fitted_scale, fitted_bias)
    return True


# ---- loop ----------------------------------------------------------------------------------------


def _batch_accuracy(raw: torch.Tensor, labels: Sequence[Label]) -> tuple[float, int]:
    """A training batch's pairwise accuracy over its comparisons (thumbs and ratings: none)."""
    right, total, start = 0.0, 0, 0
    for kind, values in labels:
        size = _answers((kind, values))
        if size > 1:
            r, t = pairwise_accuracy(raw[start : start + size], [values])
            right, total = right + r, total + t
        start += size
    return right, total


def _split(
    items: Sequence[Example], valid: Sequence[Example] | None, fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    if valid is not None:
        return list(items), list(valid)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(len(items) * fraction)) if len(items) > 1 else 0
    return [items[i] for i in order[n_valid:]], [items[i] for i in order[:n_valid]]


def _reference_answers(groups: Sequence[Group]) -> list[list[int]]:
    """The answers people liked best: each comparison's best, each up-voted answer, each answer
    rated at the top rating given (none of these: every answer)."""
    top = max((values[0] for _, (kind, values) in groups if kind == "rated"), default=None)
    liked = [
        answers[0]
        for answers, (kind, values) in groups
        if kind not in ("thumb", "rated")
        or (kind == "thumb" and values[0] > 0)
        or (kind == "rated" and values[0] == top)
    ]
    return liked or [a for answers, _ in groups for a in answers]


def train_reward_model(
    cfg: RMConfig,
    train: Sequence[Example],
    valid: Sequence[Example] | None = None,
    reference: Sequence[Demonstration] | None = None,
) -> RMResult:
    """Train a reward model on ``train`` (comparisons, thumbs, ratings), judged on ``valid``
    (None: ``cfg.valid_fraction`` of ``train``; empty: not judged), its offset set so
    ``reference`` (default: the answers people liked best, ``_reference_answers``) scores 0 on
    average; returns the saved folder and what it measured."""
    from transformers import AutoTokenizer

    from heed.models import resolve_model

    if cfg.sharding not in runtime.SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(runtime.SHARDINGS)}; got {cfg.sharding!r}")
    rt = runtime.start(cfg.seed, cfg.device)
    bf16 = runtime.use_bf16(cfg.bf16, rt.device)
    model_dir = cfg.init if cfg.init is not None else resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_items, valid_items = _split(train, valid, cfg.valid_fraction, cfg.seed)
    if not train_items:
        raise ValueError("no usable comparisons, thumbs or ratings to train on")
    encoded = [encode_example(tokenizer, c, cfg.max_length) for c in train_items]
    train_set = rt.shard(encoded)
    valid_set = [encode_example(tokenizer, c, cfg.max_length) for c in valid_items]
    weights = {name: getattr(cfg, name) for name in set(WEIGHT_OF.values())}

    # A warm start keeps what the previous reward model learned (its head and its body); a cold
    # start puts a new head on the policy's body, as the paper does.
    if cfg.init is not None:
        model = RewardModel.from_pretrained(cfg.init)
    else:
        model = RewardModel.from_causal_lm(model_dir, layers=cfg.layers)
    model.feedback.thumb_scale.fill_(1.0)  # a warm start's fitted slope: the thumbs train on the reward's scale
    model.to(rt.device).train()
    # The feedback head's scalars stay whole under fsdp (FSDP2 shards no scalar): averaged by hand.
    feedback = list(model.feedback.parameters())
    ddp_model = rt.wrap(model, cfg.sharding, whole=feedback)
    sharded = runtime.is_sharded(ddp_model)
    # The feedback head's few scalars (the thumbs' offset, the ratings' cut points) move on the
    # reward's scale, not by fine-tuning steps: their own, larger learning rate.
    body = [p for name, p in model.named_parameters() if not name.startswith("feedback.")]
    groups = [{"params": body, "lr": cfg.lr}, {"params": list(model.feedback.parameters()), "lr": cfg.feedback_lr}]
    optimizer = runtime.adamw(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    steps_per_epoch = max(1, len(train_set) // (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    step = 0
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if cfg.resume and (info := runtime.load_checkpoint(cfg.out, state)):
        step = info["step"]
        if step < total_steps:  # a finished run's checkpoint has its fitted slope: training goes on at 1
            model.feedback.thumb_scale.fill_(1.0)
    metrics = MetricsWriter(cfg.out / "metrics.jsonl", rt.is_main, after=step if cfg.resume else None)
    steps: list[RMStep] = []
    heldout: Heldout | None = None
    stream: Iterator[tuple[torch.Tensor, torch.Tensor, list[Label]]] = (
        collate(b, pad_id)
        for epoch in itertools.count()
        for b in runtime.batches(train_set, cfg.batch_size, cfg.seed, epoch)
    )
    stream = itertools.islice(stream, step * cfg.grad_accum, None)
    bar = tqdm(total=total_steps, initial=step, desc="rm", disable=not (cfg.progress and rt.is_main))
    while step < total_steps:
        loss_sum, right, total = 0.0, 0.0, 0
        for micro in range(cfg.grad_accum):  # DDP all-reduces on the last backward only
            ids, mask, labels = next(stream)
            ids, mask = ids.to(rt.device), mask.to(rt.device)
            with runtime.sync(ddp_model, micro == cfg.grad_accum - 1), runtime.autocast(bf16, rt.device):
                raw = ddp_model(ids, mask).float() + model.offset
                loss = feedback_loss(raw, labels, model.feedback, weights) / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
            r, t = _batch_accuracy(raw.detach(), labels)
            right, total = right + r, total + t
        if sharded:
            runtime.average_gradients(feedback)
        runtime.clip_gradients(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == total_steps:  # before the last held-out judgement, and saved in the last checkpoint
            calibrate_thumbs(model, encoded, pad_id, cfg.batch_size, bf16, cfg.seed)
            model.train()
        record = RMStep(step, time.time(), rt.mean(loss_sum), right / total if total else None)
        if valid_set and (step % cfg.eval_every == 0 or step == total_steps):
            heldout = evaluate(model, valid_set, pad_id, cfg.batch_size, bf16)
            record = replace(
                record,
                time=time.time(),
                valid_loss=heldout.loss,
                valid_accuracy=heldout.accuracy,
                valid_thumbs_auc=heldout.thumbs_auc,
                valid_ratings_spearman=heldout.ratings_spearman,
            )
        steps.append(record)
        metrics.write(record)
        bar.update()
        bar.set_postfix(loss=f"{record.loss:.3f}")
        if step % cfg.save_every == 0 or step == total_steps:  # a sharded model is gathered on every rank
            runtime.save_checkpoint(cfg.out, step, state, {}, write=rt.is_main)
    bar.close()

    # ---- bias: demonstrations (or, without them, the best-ranked answers) average 0 ----
    if reference is not None:
        refs = [prompt_ids(tokenizer, d.prompt) + response_ids(tokenizer, d.response) for d in reference]
    else:
        refs = _reference_answers(encoded)  # every rank the same: one offset, the same forwards
    model.offset.fill_(0.0)
    model.offset.fill_(mean_score(model, [r[-cfg.max_length :] for r in refs], pad_id, cfg.batch_size, bf16))

    # ---- save ----
    dest = cfg.out / "model"
    whole = model
    if sharded:  # gathered on every rank; rank 0 puts it into a plain reward model to save
        full = runtime.full_state_dict(model)
        if rt.is_main:
            whole = RewardModel.from_causal_lm(model_dir, layers=len(model.backbone.layers))
            whole.load_state_dict(full)
    if rt.is_main:
        with atomic_folder(dest) as tmp:
            whole.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        log.info("saved the reward model to %s (offset %.4f)", dest, float(model.offset))
    rt.barrier()
    return RMResult(dest, heldout, float(model.offset), steps)
