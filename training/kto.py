"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): align a
policy directly from unpaired desirable / undesirable answers (an app's thumbs), with the start
policy as the frozen reference. The baseline a team with only thumbs might pick instead of a
reward model and PPO: an option and a comparison, not the paper's method.

    config (training.config.KTOConfig) -> data (Judged: prompt, answer, desirable) -> models
    (the policy, trained; the reference, frozen) -> loss (kto_loss) -> loop (linear warm-up,
    held-out reward margin) -> save OUT/model -> the result (the folder and every step's metrics)

The loss of one judged answer y to x, with the implicit reward r = log pi(y|x) - log pi_ref(y|x)
(summed over the answer's tokens) and the reference point z (an estimate of KL(pi || pi_ref)):

    desirable:    lambda_D * (1 - sigmoid(beta * (r - z)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z - r)))

z is estimated as the paper and TRL do: the mean log-ratio of mismatched pairs in the batch (each
prompt with the next example's answer), clamped at 0 and without gradient, so a policy gains
nothing by moving every answer's likelihood at once.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training import runtime
from training.config import KTOConfig
from training.data import Judged, pad, prompt_ids, response_ids
from training.metrics import MetricsWriter, StepMetrics
from training.ppo import token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KTOStep(StepMetrics):
    """One optimizer step (step 0: the held-out margin before training)."""

    loss: float | None = None
    kl: float | None = None  # the batch's reference point z
    reward_desirable: float | None = None  # mean r of the batch's desirable answers
    reward_undesirable: float | None = None
    lr: float | None = None
    valid_margin: float | None = None  # held out: mean r of desirable minus of undesirable answers


@dataclass(frozen=True)
class KTOResult:
    """The saved policy and the metrics of the steps this call ran."""

    model: Path
    steps: list[KTOStep]


# ---- data ----------------------------------------------------------------------------------------

# One judged answer, encoded: (prompt ids, answer ids, desirable).
Encoded = tuple[list[int], list[int], bool]


def encode(tokenizer: Any, judged: Judged, max_length: int) -> Encoded:
    """The prompt as served (its last tokens when too long) and the answer with its end-of-turn."""
    answer = response_ids(tokenizer, judged.response)[: max_length - 1]
    prompt = prompt_ids(tokenizer, judged.prompt)[-(max_length - len(answer)) :]
    return prompt, answer, judged.desirable


def answer_logprobs(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """log pi(answer | prompt), summed over the answer's tokens, for each (prompt, answer): (B,)."""
    ids, mask = pad([p + a for p, a in pairs], pad_id)  # (B, T), right-padded
    device = runtime.model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    start = min(len(p) for p, _ in pairs) - 1  # the first position that predicts an answer token
    logp, _ = token_logprobs(model, ids, mask, temperature=1.0, start=start)  # (B, T-1)
    answer = torch.zeros_like(logp)
    for i, (p, a) in enumerate(pairs):
        answer[i, len(p) - 1 : len(p) - 1 + len(a)] = 1.0  # position t predicts token t+1
    return (logp * answer).sum(-1)


# ---- loss ----------------------------------------------------------------------------------------


def kto_loss(
    rewards: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """The mean KTO loss of a batch. ``rewards``: r per answer (B,); ``desirable``: bool (B,);
    ``kl``: the reference point z (a scalar, no gradient)."""
    gain = torch.sigmoid(beta * (rewards - kl))  # desirable: the value of r above z
    avoid = torch.sigmoid(beta * (kl - rewards))  # undesirable: the value of r below z
    losses = torch.where(desirable, desirable_weight * (1 - gain), undesirable_weight * (1 - avoid))
    return losses.mean()


def reference_point(policy_logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """z: the mean log-ratio of the mismatched pairs, at least 0, without gradient."""
    return (policy_logp - reference_logp).mean().clamp(min=0).detach()


def mismatched(batch: Sequence[Encoded]) -> list[tuple[list[int], list[int]]]:
    """Each prompt with the next example's answer: answers the policy was never judged on."""
    return [(batch[i][0], batch[(i + 1) % len(batch)][1]) for i in range(len(batch))]


@torch.no_grad()
def margin(policy: Any, reference: Any, examples: Sequence[Encoded], pad_id: int, batch_size: int) -> float | None:
    """Mean r of the desirable answers minus mean r of the undesirable ones (None: one kind missing)."""
    policy.eval()
    rewards: list[tuple[float, bool]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        pairs = [(p, a) for p, a, _ in chunk]
        r = answer_logprobs(policy, pairs, pad_id) - answer_logprobs(reference, pairs, pad_id)
        rewards += [(float(x), d) for x, (_, _, d) in zip(r, chunk, strict=True)]
    policy.train()
    up = [r for r, d in rewards if d]
    down = [r for r, d in rewards if not d]
    return sum(up) / len(up) - sum(down) / len(down) if up and down else None


# ---- loop ----------------------------------------------------------------------------------------


def train_kto(cfg: KTOConfig, train: Sequence[Judged], valid: Sequence[Judged] | None = None) -> KTOResult:
    """KTO on ``cfg.model`` from ``train`` (the margin held out on ``valid``, else on
    ``cfg.valid_fraction`` of ``train``); returns the saved policy and the steps' metrics. One
    process (no torchrun, no checkpoints yet: ``--resume`` is not read)."""
    from transformers import AutoTokenizer

    from heed.models import resolve_model

    if cfg.resume:
        raise ValueError("KTO does not resume from checkpoints yet: run it without --resume")
    # ---- data ----
    rt = runtime.start(cfg.seed, cfg.device)
    if rt.distributed:
        raise ValueError("KTO runs in one process: start it without torchrun")
    model_dir = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if valid is None:
        cut = int(len(train) * cfg.valid_fraction) if len(train) > 1 else 0
        train, valid = list(train)[cut:], list(train)[:cut]
    if len({j.desirable for j in train}) < 2:
        log.warning(
            "KTO: the training answers are all %s", "desirable" if train and train[0].desirable else "undesirable"
        )
    if not train:
        raise ValueError("no usable judged answers to train on")
    train_set = [encode(tokenizer, j, cfg.max_length) for j in train]
    valid_set = [encode(tokenizer, j, cfg.max_length) for j in valid]

    # ---- models ----
    bf16 = runtime.use_bf16(cfg.bf16, rt.device)
    policy = runtime.load_causal_lm(model_dir, trainable=True).to(rt.device)
    reference = runtime.load_causal_lm(model_dir, trainable=False, bf16=bf16).to(rt.device)
    optimizer = runtime.adamw(policy.parameters(), lr=cfg.lr)
    per_epoch = -(-len(train_set) // cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * -(-per_epoch // cfg.grad_accum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    # ---- loop ----
    metrics = MetricsWriter(cfg.out / "metrics.jsonl")
    steps = [
        KTOStep(step=0, time=time.time(), valid_margin=margin(policy, reference, valid_set, pad_id, cfg.batch_size))
    ]
    metrics.write(steps[-1])
    batches = itertools.chain.from_iterable(
        runtime.batches(train_set, cfg.batch_size, cfg.seed, epoch)
        for epoch in range(cfg.epochs if not cfg.max_steps else 10**9)
    )
    bar = tqdm(total=total, desc="kto", disable=not cfg.progress)
    for step in range(1, total + 1):
        optimizer.zero_grad()
        seen: list[tuple[float, float, float, bool]] = []  # (loss, kl, r, desirable) of the step's answers
        for _ in range(cfg.grad_accum):
            batch = next(batches, None)
            if batch is None:
                break
            pairs = [(p, a) for p, a, _ in batch]
            desirable = torch.tensor([d for _, _, d in batch], device=rt.device)
            with runtime.autocast(bf16, rt.device):
                with torch.no_grad():
                    ref = answer_logprobs(reference, pairs, pad_id)
                    kl = reference_point(
                        answer_logprobs(policy, mismatched(batch), pad_id),
                        answer_logprobs(reference, mismatched(batch), pad_id),
                    )
                rewards = answer_logprobs(policy, pairs, pad_id) - ref  # (B,)
                loss = kto_loss(rewards, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
            (loss / cfg.grad_accum).backward()
            seen += [
                (float(loss.detach()), float(kl), float(r), bool(d))
                for r, d in zip(rewards.detach(), desirable, strict=True)
            ]
        if not seen:
            break
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        up = [r for _, _, r, d in seen if d]
        down = [r for _, _, r, d in seen if not d]
        last = step == total
        steps.append(
            KTOStep(
                step=step,
                time=time.time(),
                loss=sum(x[0] for x in seen) / len(seen),
                kl=sum(x[1] for x in seen) / len(seen),
                reward_desirable=sum(up) / len(up) if up else None,
                reward_undesirable=sum(down) / len(down) if down else None,
                lr=float(schedule.get_last_lr()[0]),
                valid_margin=margin(policy, reference, valid_set, pad_id, cfg.batch_size)
                if last or step % cfg.eval_every == 0
                else None,
            )
        )
        metrics.write(steps[-1])
        bar.update()
    bar.close()

    # ---- save ----
    dest = runtime.save_causal_lm(policy, tokenizer, cfg.out / "model")
    log.info("saved the KTO policy to %s", dest)
    return KTOResult(dest, steps)
