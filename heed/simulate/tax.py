"""The alignment tax, in miniature: how much PPO against the experiment's reward model raises
the policy's negative log-likelihood on held-out pretraining text, with the pretraining mix
(PPO-ptx, gamma > 0) and without it (gamma = 0). Both runs start from the same policy, use the
same reward model, prompts, seed and budget; only gamma differs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def text_nll(folder: Path, texts: list[str], max_length: int = 256, batch_size: int = 4) -> float:
    """Mean per-token NLL of ``texts`` under the causal LM in ``folder`` (no gradients)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training import runtime
    from training.data import pad
    from training.ppo import ptx_nll

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = weight = 0.0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts[i : i + batch_size]]
            ids = [x for x in ids if len(x) > 1]
            if not ids:
                continue
            with runtime.autocast(runtime.use_bf16(None)):
                loss = float(ptx_nll(model, pad(ids, pad_id)))
            tokens = sum(len(x) - 1 for x in ids)
            total, weight = total + loss * tokens, weight + tokens
    return total / max(weight, 1)


def split(texts: list[str]) -> tuple[list[str], list[str]]:
    """(the pretraining mix, the held-out texts the tax is measured on): the two halves."""
    return texts[: len(texts) // 2], texts[len(texts) // 2 :]


def alignment_tax(
    start: Path,
    reward_model: Path,
    prompts: list[str],
    texts: list[str],
    work: Path,
    *,
    ptx_coef: float,
    iterations: int,
    episodes: int = 16,
    max_new_tokens: int = 48,
    lr: float = 1e-5,
    value_lr: float = 1e-5,
    kl_coef: float = 0.02,
    minibatch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """NLL of the held-out half of ``texts`` under ``start`` and after PPO with ``ptx_coef`` and
    with 0 (the first half is the pretraining mix)."""
    from training.config import PPOConfig
    from training.ppo import train_ppo

    work.mkdir(parents=True, exist_ok=True)
    mix, heldout = split(texts)
    before = text_nll(start, heldout)
    result: dict[str, Any] = {"heldout_texts": len(heldout), "mix_texts": len(mix), "nll_start": before, "runs": {}}
    for name, coef in (("ptx", ptx_coef), ("no_ptx", 0.0)):
        log.info("alignment tax: PPO from %s with ptx gamma %g (%d iterations)", start.name, coef, iterations)
        cfg = PPOConfig(
            policy=str(start),
            reward_model=reward_model,
            ptx_coef=coef,
            out=work / name,
            iterations=iterations,
            episodes=episodes,
            max_new_tokens=max_new_tokens,
            lr=lr,
            value_lr=value_lr,
            kl_coef=kl_coef,
            minibatch_size=minibatch_size,
            seed=seed,
            progress=False,
        )
        run = train_ppo(cfg, prompts, mix if coef > 0 else None)
        after = text_nll(run.model, heldout)
        result["runs"][name] = {
            "ptx_coef": coef,
            "nll": after,
            "nll_change": after - before,
            "reward_first": run.iterations[0].reward,
            "reward_last": run.iterations[-1].reward,
            "kl_last": run.iterations[-1].kl,
        }
    return result
