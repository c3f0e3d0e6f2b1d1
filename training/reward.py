"""The reward model: the SFT policy's backbone with its unembedding replaced by a scalar head,
trained on K-way rankings with the paper's loss, then offset so demonstrations score 0.

    config (training.config.RMConfig) -> data (comparisons) -> model (RewardModel) -> loss
    (kway_loss) -> loop (one epoch, held-out pairwise accuracy) -> bias -> save OUT/model (a
    loadable folder) -> the result (the folder, the held-out accuracy, every step's metrics).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from heed.datadir import atomic_folder
from training import runtime
from training.config import RMConfig
from training.data import Comparison, Demonstration, Prompt, pad, prompt_ids, response_ids
from training.metrics import MetricsWriter, StepMetrics

log = logging.getLogger(__name__)
HEAD_FILE = "reward_head.pt"


@dataclass(frozen=True)
class Heldout:
    """A reward model judged on held-out comparisons: the share of pairs it orders as the labelers
    ranked them (a tie counts half), its K-way loss, and how many comparisons."""

    accuracy: float
    loss: float
    comparisons: int


@dataclass(frozen=True)
class RMStep(StepMetrics):
    """One optimizer step: the training batch's loss and pairwise accuracy, and the held-out ones
    at an evaluation step."""

    loss: float
    accuracy: float
    valid_loss: float | None = None
    valid_accuracy: float | None = None


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
        self.register_buffer("offset", torch.zeros(()))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1) - self.offset

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per right-padded sequence: the value at its last real token."""
        last = attention_mask.sum(dim=1) - 1
        return self.values(input_ids, attention_mask)[torch.arange(len(last)), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False):
        """``score`` (or, with ``per_token``, ``values``): DistributedDataParallel calls this."""
        return self.values(input_ids, attention_mask) if per_token else self.score(input_ids, attention_mask)

    @classmethod
    def from_causal_lm(cls, folder: Path | str, dtype: torch.dtype = torch.float32) -> RewardModel:
        """A new reward model on a policy's body (its unembedding dropped), head untrained."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(str(folder), dtype=dtype))

    @classmethod
    def from_pretrained(cls, folder: Path | str, dtype: torch.dtype = torch.float32) -> RewardModel:
        """Load what ``save_pretrained`` wrote."""
        model = cls.from_causal_lm(folder, dtype)
        head = torch.load(Path(folder) / HEAD_FILE, weights_only=True)
        model.head.load_state_dict(head["head"])
        model.offset.fill_(head["offset"])
        return model

    def save_pretrained(self, folder: Path) -> None:
        """The backbone as a Hugging Face folder, plus the head and its offset beside it."""
        self.backbone.save_pretrained(folder)
        torch.save({"head": self.head.state_dict(), "offset": float(self.offset)}, folder / HEAD_FILE)
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


# One prompt's answers, best first, and their ranks (equal ranks: tied).
Group = tuple[list[list[int]], tuple[int, ...]]


def encode_comparison(tokenizer: Any, comparison: Comparison, max_length: int) -> Group:
    return encode_answers(tokenizer, comparison.prompt, comparison.responses, max_length), comparison.rank_list()


def collate(groups: list[Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
    """All answers of all prompts in one right-padded batch, and each prompt's ranks."""
    ids, mask = pad([seq for g, _ in groups for seq in g], pad_id)
    return ids, mask, [ranks for _, ranks in groups]


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


@torch.no_grad()
def evaluate(model: RewardModel, groups: list[Group], pad_id: int, batch_size: int, bf16: bool) -> Heldout:
    """Pairwise accuracy and K-way loss on ``groups`` (encoded held-out comparisons)."""
    model.eval()
    right, total = 0.0, 0
    loss_sum = 0.0
    for i in range(0, len(groups), batch_size):
        ids, mask, ranks = collate(groups[i : i + batch_size], pad_id)
        with runtime.autocast(bf16):
            rewards = model.score(ids, mask).float()
        loss_sum += float(kway_loss(rewards, ranks)) * len(ranks)
        r, t = pairwise_accuracy(rewards, ranks)
        right, total = right + r, total + t
    model.train()
    return Heldout(right / max(total, 1), loss_sum / max(len(groups), 1), len(groups))


@torch.no_grad()
def mean_score(model: RewardModel, sequences: list[list[int]], pad_id: int, batch_size: int, bf16: bool) -> float:
    model.eval()
    scores = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = pad(sequences[i : i + batch_size], pad_id)
        with runtime.autocast(bf16):
            scores.append(model.score(ids, mask).float())
    return float(torch.cat(scores).mean())


# ---- loop ----------------------------------------------------------------------------------------


def _split(
    items: Sequence[Comparison], valid: Sequence[Comparison] | None, fraction: float, seed: int
) -> tuple[list[Comparison], list[Comparison]]:
    if valid is not None:
        return list(items), list(valid)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(len(items) * fraction)) if len(items) > 1 else 0
    return [items[i] for i in order[n_valid:]], [items[i] for i in order[:n_valid]]


def train_reward_model(
    cfg: RMConfig,
    train: Sequence[Comparison],
    valid: Sequence[Comparison] | None = None,
    reference: Sequence[Demonstration] | None = None,
) -> RMResult:
    """Train a reward model on ``train``, judged on ``valid`` (None: ``cfg.valid_fraction`` of
    ``train``; empty: not judged), its offset set so ``reference`` (default: the best-ranked
    training answers) scores 0 on average; returns the saved folder and what it measured."""
    from transformers import AutoTokenizer

    from heed.models import resolve_model

    rt = runtime.start(cfg.seed)
    bf16 = runtime.use_bf16(cfg.bf16)
    model_dir = cfg.init if cfg.init is not None else resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_items, valid_items = _split(train, valid, cfg.valid_fraction, cfg.seed)
    if not train_items:
        raise ValueError("no usable comparisons to train on")
    train_set = rt.shard([encode_comparison(tokenizer, c, cfg.max_length) for c in train_items])
    valid_set = [encode_comparison(tokenizer, c, cfg.max_length) for c in valid_items]

    # A warm start keeps what the previous reward model learned (its head and its body); a cold
    # start puts a new head on the policy's body, as the paper does.
    model = RewardModel.from_pretrained(cfg.init) if cfg.init is not None else RewardModel.from_causal_lm(model_dir)
    model.train()
    ddp_model = rt.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    steps_per_epoch = max(1, len(train_set) // (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    step = 0
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if cfg.resume and (info := runtime.load_checkpoint(cfg.out, state)):
        step = info["step"]
    metrics = MetricsWriter(cfg.out / "metrics.jsonl", rt.is_main, after=step if cfg.resume else None)
    steps: list[RMStep] = []
    heldout: Heldout | None = None
    stream: Iterator[tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]] = (
        collate(b, pad_id)
        for epoch in itertools.count()
        for b in runtime.batches(train_set, cfg.batch_size, cfg.seed, epoch)
    )
    stream = itertools.islice(stream, step * cfg.grad_accum, None)
    bar = tqdm(total=total_steps, initial=step, desc="rm", disable=not (cfg.progress and rt.is_main))
    while step < total_steps:
        loss_sum, right, total = 0.0, 0.0, 0
        for micro in range(cfg.grad_accum):  # DDP all-reduces on the last backward only
            ids, mask, ranks = next(stream)
            with runtime.sync(ddp_model, micro == cfg.grad_accum - 1), runtime.autocast(bf16):
                rewards = ddp_model(ids, mask)
                loss = kway_loss(rewards.float(), ranks) / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
            r, t = pairwise_accuracy(rewards.detach(), ranks)
            right, total = right + r, total + t
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = RMStep(step, time.time(), rt.mean(loss_sum), right / max(total, 1))
        if valid_set and (step % cfg.eval_every == 0 or step == total_steps):
            heldout = evaluate(model, valid_set, pad_id, cfg.batch_size, bf16)
            record = replace(record, time=time.time(), valid_loss=heldout.loss, valid_accuracy=heldout.accuracy)
        steps.append(record)
        metrics.write(record)
        bar.update()
        bar.set_postfix(loss=f"{record.loss:.3f}")
        if rt.is_main and (step % cfg.save_every == 0 or step == total_steps):
            runtime.save_checkpoint(cfg.out, step, state, {})
    bar.close()

    # ---- bias: demonstrations (or, without them, the best-ranked answers) average 0 ----
    if reference is not None:
        refs = [prompt_ids(tokenizer, d.prompt) + response_ids(tokenizer, d.response) for d in reference]
    else:
        refs = [answers[0] for answers, _ in train_set]
    model.offset.fill_(0.0)
    model.offset.fill_(mean_score(model, [r[-cfg.max_length :] for r in refs], pad_id, cfg.batch_size, bf16))

    # ---- save ----
    dest = cfg.out / "model"
    if rt.is_main:
        with atomic_folder(dest) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        log.info("saved the reward model to %s (offset %.4f)", dest, float(model.offset))
    rt.barrier()
    return RMResult(dest, heldout, float(model.offset), steps)
