"""Supervised fine-tuning on demonstrations: next-token loss on the response tokens only.

config -> data (chat template, prompt tokens masked) -> model -> loss -> loop (cosine
schedule, validation loss) -> save a Hugging Face folder at OUT/model.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from heed.config import option
from training import runtime
from training.data import Demonstration, pad, prompt_ids, read_demonstrations, response_ids
from training.metrics import MetricsWriter

log = logging.getLogger(__name__)
IGNORE = -100  # label of the tokens that carry no loss (the prompt, the padding)


@dataclass(frozen=True)
class SFTConfig:
    model: str = option("default", "the policy to fine-tune: a HF folder or 'default' (SmolLM2-135M)")
    train: Path | None = option(None, "demonstrations JSONL (required)")
    valid: Path | None = option(None, "held-out demonstrations JSONL (default: --valid-fraction of --train)")
    valid_fraction: float = option(0.1, "share of --train held out when --valid is not given")
    out: Path = option(Path("runs/sft"), "run folder: metrics.jsonl, checkpoint/, model/")
    epochs: int = option(2, "passes over the demonstrations")
    max_steps: int = option(0, "stop after this many optimizer steps (0: --epochs decides)")
    batch_size: int = option(8, "demonstrations per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr * this")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_length: int = option(512, "tokens per example (prompt + response), longer ones are cut")
    eval_every: int = option(50, "validation loss every N steps (and at the end)")
    save_every: int = option(100, "checkpoint every N steps (and at the end)")
    bf16: bool | None = option(None, "bf16 autocast (default: where the CPU has native bf16)")
    lora_r: int = option(0, "LoRA rank for the policy (0: full fine-tuning)")
    seed: int = option(0, "seed for data order and initialisation")
    strict: bool = option(False, "refuse (instead of skip) bad records in the input files")
    resume: bool = option(False, "continue from OUT/checkpoint if there is one")
    progress: bool = option(True, "show a progress bar")


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


def split(demos: list[Demonstration], valid: list[Demonstration] | None, fraction: float, seed: int):
    if valid is not None:
        return demos, valid
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
def validation_loss(model: Any, examples: list, pad_id: int, batch_size: int, bf16: bool) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        with runtime.autocast(bf16):
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


def train_sft(cfg: SFTConfig) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.train``; returns the saved model folder."""
    if cfg.train is None:
        raise ValueError("--train (a demonstrations JSONL file) is required")
    from transformers import AutoTokenizer

    from heed.models import resolve_model

    rt = runtime.start(cfg.seed)
    bf16 = runtime.use_bf16(cfg.bf16)
    model_dir = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    demos = read_demonstrations(cfg.train, cfg.strict)
    valid = read_demonstrations(cfg.valid, cfg.strict) if cfg.valid else None
    train_demos, valid_demos = split(demos, valid, cfg.valid_fraction, cfg.seed)
    if not train_demos:
        raise ValueError(f"{cfg.train}: no usable demonstrations")
    train_set = rt.shard([encode(tokenizer, d, cfg.max_length) for d in train_demos])
    valid_set = [encode(tokenizer, d, cfg.max_length) for d in valid_demos]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = runtime.load_causal_lm(model_dir, trainable=True)
    if cfg.lora_r > 0:
        model = runtime.add_lora(model, cfg.lora_r)
    model.train()
    ddp_model = rt.wrap(model)
    optimizer = torch.optim.AdamW(
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
    if step == 0 and valid_set:
        metrics.write(0, valid_loss=validation_loss(model, valid_set, pad_id, cfg.batch_size, bf16))

    # One endless stream of micro-batches, epoch after epoch, in an order fixed by the seed; a
    # resumed run skips what the checkpointed steps already consumed.
    stream = (
        collate(b, pad_id)
        for epoch in itertools.count()
        for b in runtime.batches(train_set, cfg.batch_size, cfg.seed, epoch)
    )
    stream = itertools.islice(stream, step * cfg.grad_accum, None)
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not (cfg.progress and rt.is_main))
    while step < total_steps:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):  # DDP all-reduces on the last backward only
            with runtime.sync(ddp_model, micro == cfg.grad_accum - 1), runtime.autocast(bf16):
                loss = response_loss(ddp_model, next(stream)) / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"loss": rt.mean(loss_sum), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
        if valid_set and (step % cfg.eval_every == 0 or step == total_steps):
            row["valid_loss"] = validation_loss(model, valid_set, pad_id, cfg.batch_size, bf16)
        metrics.write(step, **row)
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if rt.is_main and (step % cfg.save_every == 0 or step == total_steps):
            runtime.save_checkpoint(cfg.out, step, state, {})
    bar.close()

    # ---- save ----
    dest = cfg.out / "model"
    if rt.is_main:
        runtime.save_causal_lm(model, tokenizer, dest)
        log.info("saved the SFT policy to %s", dest)
    rt.barrier()
    return dest
