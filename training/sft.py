"""Supervised fine-tuning on demonstrations: next-token loss on the response tokens only.

config (training.config.SFTConfig) -> data (chat template, prompt tokens masked) -> model ->
loss -> loop (cosine schedule, validation loss) -> save a Hugging Face folder at OUT/model ->
the result (the folder and every step's metrics).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training import runtime
from training.config import SFTConfig
from training.data import Demonstration, pad, prompt_ids, response_ids
from training.metrics import MetricsWriter, StepMetrics

log = logging.getLogger(__name__)
IGNORE = -100  # label of the tokens that carry no loss (the prompt, the padding)


@dataclass(frozen=True)
class SFTStep(StepMetrics):
    """One optimizer step (step 0: the validation loss before training)."""

    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    valid_loss: float | None = None


@dataclass(frozen=True)
class SFTResult:
    """The saved policy and the metrics of the steps this call ran (a resumed run: those after
    its checkpoint)."""

    model: Path
    steps: list[SFTStep]


# ---- data ----------------------------------------------------------------------------------------


def encode(tokenizer: Any, demo: Demonstration, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat-formatted prompt then the response; only the response is
    labelled, because we teach the answer, not the question."""
    p, r = prompt_ids(tokenizer, demo.prompt), response_ids(tokenizer, demo.response)
    ids = (p + r)[:max_length]
    labels = ([IGNORE] * len(p) + r)[:max_length]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([e[0] for e in examples], pad_id)
    labels, _ = pad([e[1] for e in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split(
    demos: Sequence[Demonstration], valid: Sequence[Demonstration] | None, fraction: float, seed: int
) -> tuple[list[Demonstration], list[Demonstration]]:
    if valid is not None:
        return list(demos), list(valid)
    order = list(range(len(demos)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(len(demos) * fraction)) if len(demos) > 1 else 0
    return [demos[i] for i in order[n_valid:]], [demos[i] for i in order[:n_valid]]


# ---- loss ------------------------------------------------------------------------------------------


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens. The unembedding runs
    only from the first labelled position on: with a 49k vocabulary it is most of the cost."""
    labels = batch["labels"]
    labelled = (labels != IGNORE).any(0).nonzero()
    first = max(int(labelled[0]) - 1, 0) if len(labelled) else 0
    keep = labels.shape[1] - first
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, first + 1 :].flatten(), ignore_index=IGNORE
    )


@torch.no_grad()
def validation_loss(
    model: Any, examples: list, pad_id: int, batch_size: int, bf16: bool, rt: runtime.Runtime | None = None
) -> float:
    rt = rt or runtime.Runtime()
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = rt.to_device(collate(examples[i : i + batch_size], pad_id))
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        with runtime.autocast(bf16, rt.device):
            total += float(response_loss(model, batch)) * n
        tokens += n
    model.train()
    return total / max(tokens, 1)


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ---- loop ------------------------------------------------------------------------------------------


def train_sft(
    cfg: SFTConfig, train: Sequence[Demonstration], valid: Sequence[Demonstration] | None = None
) -> SFTResult:
    """Fine-tune ``cfg.model`` on ``train`` (validated on ``valid``, else on ``cfg.valid_fraction``
    of ``train``); returns the saved model folder and the steps' metrics."""
    from transformers import AutoTokenizer

    from heed.models import resolve_model

    if cfg.sharding not in runtime.SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(runtime.SHARDINGS)}; got {cfg.sharding!r}")
    if cfg.sharding == "fsdp" and cfg.lora_r > 0:
        raise ValueError("sharding fsdp is for full fine-tuning: LoRA's trained part fits one device (use ddp)")
    rt = runtime.start(cfg.seed, cfg.device)
    bf16 = runtime.use_bf16(cfg.bf16, rt.device)
    model_dir = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train_demos, valid_demos = split(train, valid, cfg.valid_fraction, cfg.seed)
    if not train_demos:
        raise ValueError("no usable demonstrations to train on")
    train_set = rt.shard([encode(tokenizer, d, cfg.max_length) for d in train_demos])
    valid_set = [encode(tokenizer, d, cfg.max_length) for d in valid_demos]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = runtime.load_causal_lm(model_dir, trainable=True).to(rt.device)
    if cfg.lora_r > 0:
        model = runtime.add_lora(model, cfg.lora_r)
    model.train()
    ddp_model = rt.wrap(model, cfg.sharding)  # fsdp: model itself, sharded in place
    optimizer = runtime.adamw(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = max(1, len(train_set) // (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )

    step = 0
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if cfg.resume and (info := runtime.load_checkpoint(cfg.out, state)):
        step = info["step"]
    metrics = MetricsWriter(cfg.out / "metrics.jsonl", rt.is_main, after=step if cfg.resume else None)
    steps: list[SFTStep] = []
    if step == 0 and valid_set:
        before = validation_loss(model, valid_set, pad_id, cfg.batch_size, bf16, rt)
        steps.append(SFTStep(0, time.time(), valid_loss=before))
        metrics.write(steps[-1])

    # One endless stream of micro-batches, epoch after epoch, in an order fixed by the seed; a
    # resumed run skips what the checkpointed steps already consumed.
    stream: Iterator[dict[str, torch.Tensor]] = (
        rt.to_device(collate(b, pad_id))
        for epoch in itertools.count()
        for b in runtime.batches(train_set, cfg.batch_size, cfg.seed, epoch)
    )
    stream = itertools.islice(stream, step * cfg.grad_accum, None)
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not (cfg.progress and rt.is_main))
    while step < total_steps:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):  # DDP all-reduces on the last backward only
            with runtime.sync(ddp_model, micro == cfg.grad_accum - 1), runtime.autocast(bf16, rt.device):
                loss = response_loss(ddp_model, next(stream)) / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        grad_norm = runtime.clip_gradients(model.parameters(), 1.0)  # the whole norm, also when sharded
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        valid_loss: float | None = None
        if valid_set and (step % cfg.eval_every == 0 or step == total_steps):
            valid_loss = validation_loss(model, valid_set, pad_id, cfg.batch_size, bf16, rt)
        mean_loss, lr = rt.mean(loss_sum), float(scheduler.get_last_lr()[0])
        steps.append(SFTStep(step, time.time(), mean_loss, lr, float(grad_norm), valid_loss))
        metrics.write(steps[-1])
        bar.update()
        bar.set_postfix(loss=f"{mean_loss:.3f}")
        if step % cfg.save_every == 0 or step == total_steps:  # a sharded model is gathered on every rank
            runtime.save_checkpoint(cfg.out, step, state, {}, write=rt.is_main)
    bar.close()

    # ---- save ----
    dest = cfg.out / "model"
    runtime.save_causal_lm(model, tokenizer, dest, write=rt.is_main)
    if rt.is_main:
        log.info("saved the SFT policy to %s", dest)
    rt.barrier()
    return SFTResult(dest, steps)
