"""PPO and PPO-ptx against a reward model (Ouyang et al. 2022, section 3.5).

One episode is a prompt and one sampled response (a bandit). Its reward is the RM's score of
the whole response minus a per-token KL penalty against the reference (SFT) policy:
    R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))
and PPO-ptx adds gamma * E_pretraining[log pi(x)] to the objective. The value function starts
from the reward model. Demonstrations (the round's corrections), when given, make up
``--ptx-demo-share`` of each ptx batch: log pi(answer | prompt), the loss on the answer only, so
the term that holds the policy to its language also pulls it towards what callers wrote.

    config (training.config.PPOConfig) -> data (prompts, pretraining text, demonstrations) -> models (policy,
    reference, value, reward) -> losses (gae, ppo_loss, value_loss) -> loop (rollout, score,
    update) -> save OUT/model -> the result (the folder and every iteration's metrics).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from heed.hardware import engine_dtype
from training import runtime
from training.config import PPOConfig, SamplingEngine
from training.data import Demonstration, Prompt, empty_answers, pad, prompt_ids, text_ids
from training.metrics import MetricsWriter, StepMetrics
from training.reward import load_reward_model
from training.sampling import HFSampler, Sampler, VLLMSampler
from training.sft import IGNORE, encode

log = logging.getLogger(__name__)
# (input_ids, attention_mask, response_mask) of right-padded prompt+response -> one score each
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PPOIteration(StepMetrics):
    """One rollout-then-update iteration (``step``: its number, from 1)."""

    reward: float  # the reward model's score, mean over episodes
    kl: float  # KL(pi || pi_SFT) summed over the response, mean over episodes (the sampling policy's)
    kl_coef: float  # beta during this iteration
    response_length: float  # tokens per response
    policy_loss: float
    value_loss: float
    clipfrac: float  # share of tokens where the ratio clip was active
    entropy: float  # of the next-token distribution, per response token
    approx_kl: float  # between the sampling and the updated policy, per token
    time_generate: float  # seconds, including time_refresh
    time_refresh: float
    time_score: float
    time_update: float
    episodes_per_s: float
    tokens_per_s: float
    ptx_loss: float | None = None  # PPO-ptx: the pretraining text's NLL (None without ptx)


@dataclass(frozen=True)
class PPOResult:
    """The saved policy and the metrics of the iterations this call ran (a resumed run: those after
    its checkpoint); ``stopped_early``: the KL passed ``stop_kl`` and the policy before is kept."""

    model: Path
    iterations: list[PPOIteration]
    stopped_early: bool = False
    adapter: Path | None = None  # with LoRA: the adapter alone (peft), on the policy it started from


# ---- per-token quantities ------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_logprobs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, temperature: float, start: int = 0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | tokens_<t) at index t-1 for t = 1..T-1 (and each next-token distribution's
    entropy); zero before ``start``, where no response token is predicted: the unembedding is
    the dominant cost with a 49k vocabulary, so it runs on the response positions only."""
    keep = ids.shape[1] - start
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=logits.device)
    logp[:, start:] = logp_all.gather(-1, ids[:, start + 1 :, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    entropy = torch.zeros_like(logp)
    entropy[:, start:] = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---- losses (check against the paper and Schulman et al. 2017) ---------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens; (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last  # the episode ends after its last token
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def ppo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L^CLIP = -E[min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)], rho = pi / pi_old; and the
    fraction of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """0.5 * E[max((V - R)^2, (V_clipped - R)^2)]: the value may not move far from the rollout's."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ptx_nll(model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean negative log-likelihood of pretraining text (PPO-ptx adds gamma times this to the loss):
    ``batch`` is (ids, mask), or (ids, mask, labels) with -100 on the tokens not learned (a
    demonstration's prompt)."""
    device = runtime.model_device(model)
    ids, mask = batch[0].to(device), batch[1].to(device)
    labels = batch[2].to(device) if len(batch) > 2 else ids
    labels = labels.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def ptx_batch(
    texts: Sequence[list[int]],
    demos: Sequence[tuple[list[int], list[int]]],
    size: int,
    demo_share: float,
    pad_id: int,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels) of ``size`` ptx examples: each a demonstration with probability
    ``demo_share`` (always, without texts; never, without demonstrations), else a text."""
    picked = []
    for _ in range(size):
        if demos and (not texts or rng.random() < demo_share):
            picked.append(rng.choice(demos))
        else:
            text = rng.choice(texts)
            picked.append((text, text))
    ids, mask = pad([p[0] for p in picked], pad_id)
    labels, _ = pad([p[1] for p in picked], IGNORE)
    return ids, mask, labels


class AdaptiveKL:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int, adaptive: bool) -> None:
        self.beta, self.target, self.horizon, self.adaptive = beta, target, horizon, adaptive

    def update(self, kl: float, n_episodes: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n_episodes / self.horizon


# ---- the loop ------------------------------------------------------------------------------------


def empty_last(scores: torch.Tensor, empty: Sequence[bool], margin: float = 1.0) -> torch.Tensor:
    """``scores`` with each empty answer's set ``margin`` below the lowest of the answers with text
    (all empty: the lowest score, less ``margin``). A reward model trained on answers people saw
    extrapolates to the empty one: in one run its "short is good" scored them so well that 27% of
    a round's answers were empty, which every labeler scores 0, and users rolled the version back."""
    mask = torch.tensor(list(empty), dtype=torch.bool, device=scores.device)
    if not mask.any():
        return scores
    floor = (scores[~mask] if (~mask).any() else scores).min() - margin
    return torch.where(mask, floor, scores)


def rm_scorer(reward_model: Any) -> Scorer:
    return lambda ids, mask, response_mask: reward_model.score(ids, mask).float()


def make_sampler(
    cfg: PPOConfig, policy: Any, policy_dir: Path | str, tokenizer: Any, rt: runtime.Runtime | None = None
) -> Sampler:
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if cfg.rollout == SamplingEngine.VLLM:
        try:
            dtype = engine_dtype("auto")
            return VLLMSampler(
                policy_dir,
                eos,
                cfg.seed,
                cfg.max_prompt_length + cfg.max_new_tokens + 8,
                dtype,
                cfg.rollout_gpu_memory_utilization,
                cfg.weight_transfer,
                runtime.model_device(policy),
                rt is not None and rt.distributed,
                # A LoRA policy: the engine gets its adapter alone (a sharded one is merged, as a whole policy is).
                lora_rank=0 if runtime.is_sharded(policy) else runtime.lora_rank(policy),
            )
        except ImportError:
            log.warning("vLLM is not installed: rollouts fall back to transformers.generate")
    elif cfg.rollout != SamplingEngine.HF:
        raise ValueError(f"--rollout must be 'vllm' or 'hf', not {cfg.rollout!r}")
    return HFSampler(policy, pad_id, eos)


def prompt_pool(tokenizer: Any, prompts: Sequence[Prompt], max_prompt_length: int) -> list[list[int]]:
    """The prompt pool as episodes start from it: each prompt's ids (the served ids, for a prompt
    from the log), its last ``max_prompt_length`` tokens."""
    return [prompt_ids(tokenizer, p)[-max_prompt_length:] for p in prompts]


def train_ppo(
    cfg: PPOConfig,
    prompts: Sequence[Prompt],
    ptx_texts: Sequence[str] | None = None,
    *,
    demonstrations: Sequence[Demonstration] | None = None,
    scorer: Scorer | None = None,
    sampler: Sampler | None = None,
) -> PPOResult:
    """Optimise the policy on ``prompts`` against the reward model (or ``scorer``), with PPO-ptx's
    pretraining term on ``ptx_texts`` and ``demonstrations`` when ``cfg.ptx_coef`` > 0; returns the
    saved folder and every iteration's metrics.

    ``sampler``: an engine already running on ``cfg.policy`` to reuse (the caller closes it)."""
    if problems := cfg.problems():
        raise ValueError("; ".join(problems))
    if cfg.reward_model is None:
        raise ValueError("--reward-model (a folder) is required")
    from transformers import AutoTokenizer

    from heed.models import resolve_model

    # ---- data ----
    rt = runtime.start(cfg.seed, cfg.device)
    bf16 = runtime.use_bf16(cfg.bf16, rt.device)
    policy_dir = resolve_model(cfg.policy)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pool = prompt_pool(tokenizer, prompts, cfg.max_prompt_length)
    if not pool:
        raise ValueError("no usable prompts")
    texts = [text_ids(tokenizer, t, cfg.ptx_max_length) for t in ptx_texts or []]
    texts = [t for t in texts if len(t) > 1]
    demonstrations = demonstrations if cfg.ptx_demo_share > 0 else None  # a share of 0: no correction in the mix
    demos = [encode(tokenizer, d, cfg.max_prompt_length + cfg.ptx_max_length) for d in demonstrations or []]
    demos = [d for d in demos if any(label != IGNORE for label in d[1][1:])]
    if cfg.ptx_coef > 0 and not texts and not demos:
        raise ValueError("--ptx-coef > 0 needs --ptx-data (pretraining text JSONL) or --demonstrations")

    # ---- models: the trained policy and value, the frozen reference and reward ----
    policy = runtime.load_causal_lm(policy_dir, trainable=True)
    if cfg.init_adapter is not None:  # a warm start: the adapter trains on, the reference is where it starts
        policy = runtime.load_lora(policy, cfg.init_adapter, trainable=True).to(rt.device)
        reference = runtime.merged_lora(policy_dir, cfg.init_adapter)
        reference = reference.to(rt.device, torch.bfloat16 if bf16 else torch.float32)
    else:
        policy = (runtime.add_lora(policy, cfg.lora_r) if cfg.lora_r > 0 else policy).to(rt.device)
        reference = runtime.load_causal_lm(policy_dir, trainable=False, bf16=bf16).to(rt.device)
    value_model = load_reward_model(cfg.reward_model, trainable=True).to(rt.device)
    # The value function is the head at every position; the thumbs' offset and the ratings' cut
    # points mean nothing to it (and, untouched by its loss, would stall a torchrun job's all-reduce).
    value_model.feedback.requires_grad_(False)
    if scorer is None:
        scorer = rm_scorer(load_reward_model(cfg.reward_model, trainable=False, bf16=bf16).to(rt.device))
    ddp_policy, ddp_value = rt.wrap(policy), rt.wrap(value_model)
    policy_opt = runtime.adamw([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
    value_opt = runtime.adamw([p for p in value_model.parameters() if p.requires_grad], lr=cfg.value_lr, eps=1e-5)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)

    start = 0
    state = {"policy": policy, "value": value_model, "policy_opt": policy_opt, "value_opt": value_opt}
    if cfg.resume and (info := runtime.load_checkpoint(cfg.out, state)):
        start, kl_ctl.beta = info["step"], info["kl_coef"]
    metrics = MetricsWriter(cfg.out / "metrics.jsonl", rt.is_main, after=start if cfg.resume else None)
    iterations: list[PPOIteration] = []
    stopped_early = False
    owns_sampler = sampler is None
    sampler = sampler or make_sampler(cfg, policy, policy_dir, tokenizer, rt)
    bar = tqdm(total=cfg.iterations, initial=start, desc="ppo", disable=not (cfg.progress and rt.is_main))
    kept: dict[str, torch.Tensor] | None = None  # with --stop-kl: the policy before the last update
    for iteration in range(start, cfg.iterations):
        rng = random.Random(cfg.seed * 1_000_003 + iteration * 7919 + rt.rank)

        # ---- rollout: one sampled response per prompt ----
        t0 = time.perf_counter()
        if iteration > 0 or not owns_sampler or cfg.init_adapter:  # the engine started on policy_dir's weights
            sampler.refresh(policy)
        t_refresh = time.perf_counter() - t0
        episode_prompts = [rng.choice(pool) for _ in range(cfg.episodes)]
        responses = sampler.generate(episode_prompts, cfg.max_new_tokens, cfg.temperature)
        t1 = time.perf_counter()

        # ---- score: old log-probs, reference log-probs, values, RM score, per-token reward ----
        ids, mask = pad([p + r for p, r in zip(episode_prompts, responses, strict=True)], pad_id)
        response_mask = torch.zeros_like(mask)
        for i, (p, r) in enumerate(zip(episode_prompts, responses, strict=True)):
            response_mask[i, len(p) : len(p) + len(r)] = 1
        ids, mask, response_mask = ids.to(rt.device), mask.to(rt.device), response_mask.to(rt.device)
        action_mask = response_mask[:, 1:].float()  # position t-1 predicts token t
        first = min(len(p) for p in episode_prompts) - 1  # the first position that predicts a response token
        with torch.no_grad(), runtime.autocast(bf16, rt.device):
            old_logp, _ = token_logprobs(policy, ids, mask, cfg.temperature, first)
            ref_logp, _ = token_logprobs(reference, ids, mask, cfg.temperature, first)
            old_values = value_model.values(ids, mask)[:, :-1].float()
            scores = scorer(ids, mask, response_mask).float()
        if cfg.empty_last:
            scores = empty_last(scores, empty_answers(tokenizer, responses))
        kl_tokens = (old_logp - ref_logp) * action_mask
        kl = rt.mean(float(kl_tokens.sum(1).mean()))  # KL(pi || pi_SFT) per episode, of the sampling policy
        if cfg.stop_kl > 0:
            if kept is not None and kl > cfg.stop_kl:  # this policy went too far: keep the one before
                policy.load_state_dict(kept, strict=False)
                log.info("stopped at iteration %d: KL %.3f > %g; kept the one before", iteration + 1, kl, cfg.stop_kl)
                stopped_early = True
                break
            # What the update changes (with LoRA: the adapter alone, not a copy of the frozen base).
            kept = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
        rewards = -kl_ctl.beta * kl_tokens
        last = action_mask.shape[1] - 1 - action_mask.flip(1).argmax(1)  # each episode's last token
        rewards[torch.arange(len(last), device=last.device), last] += scores
        advantages, returns = gae(rewards, old_values * action_mask, action_mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, action_mask)  # per-batch advantage normalisation
        t2 = time.perf_counter()

        # ---- update: PPO epochs over minibatches, policy and value, plus ptx ----
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clipfrac", "entropy", "ptx_loss", "approx_kl")
        }
        n_updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.episodes, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            micro = [order[i : i + cfg.minibatch_size] for i in range(0, cfg.episodes, cfg.minibatch_size)]
            for k, idx in enumerate(micro):
                am = action_mask[idx]
                # Gradients of every micro-batch accumulate locally; DDP all-reduces on the last
                # backward before an optimizer step (runtime.sync), as in gradient accumulation.
                step_now = (k + 1) % cfg.grad_accum == 0 or k + 1 == len(micro)
                with runtime.sync(ddp_policy, step_now and cfg.ptx_coef == 0), runtime.autocast(bf16, rt.device):
                    logp, entropy = token_logprobs(ddp_policy, ids[idx], mask[idx], cfg.temperature, first, True)
                    assert entropy is not None
                    pg_loss, clipfrac = ppo_loss(logp, old_logp[idx], advantages[idx], am, cfg.clip_range)
                    (pg_loss / cfg.grad_accum).backward()
                if cfg.ptx_coef > 0:  # PPO-ptx: + gamma * (negative log-likelihood of pretraining text)
                    with runtime.sync(ddp_policy, step_now), runtime.autocast(bf16, rt.device):
                        batch = ptx_batch(texts, demos, cfg.ptx_batch_size, cfg.ptx_demo_share, pad_id, rng)
                        ptx = ptx_nll(ddp_policy, batch)
                        (cfg.ptx_coef * ptx / cfg.grad_accum).backward()
                    stats["ptx_loss"].append(float(ptx.detach()))
                with runtime.sync(ddp_value, step_now), runtime.autocast(bf16, rt.device):
                    values = ddp_value(ids[idx], mask[idx], per_token=True)[:, :-1].float()
                    v_loss = value_loss(values, old_values[idx], returns[idx], am, cfg.value_clip)
                    (v_loss / cfg.grad_accum).backward()
                if (k + 1) % cfg.grad_accum == 0 or k + 1 == len(micro):
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.max_grad_norm)
                    policy_opt.step()
                    value_opt.step()
                    policy_opt.zero_grad(set_to_none=True)
                    value_opt.zero_grad(set_to_none=True)
                    n_updates += 1
                stats["policy_loss"].append(float(pg_loss.detach()))
                stats["value_loss"].append(float(v_loss.detach()))
                stats["clipfrac"].append(float(clipfrac))
                stats["entropy"].append(float(masked_mean(entropy.detach(), am)))
                stats["approx_kl"].append(float(masked_mean(old_logp[idx] - logp.detach(), am)))
        t3 = time.perf_counter()

        # ---- metrics ----
        n_tokens = int(response_mask.sum())
        means = {k: rt.mean(sum(v) / len(v)) for k, v in stats.items() if v}  # over micro-batches and ranks

        record = PPOIteration(
            step=iteration + 1,
            time=time.time(),
            reward=rt.mean(float(scores.mean())),
            kl=kl,
            kl_coef=kl_ctl.beta,
            response_length=n_tokens / cfg.episodes,
            policy_loss=means["policy_loss"],
            value_loss=means["value_loss"],
            clipfrac=means["clipfrac"],
            entropy=means["entropy"],
            approx_kl=means["approx_kl"],
            time_generate=t1 - t0,
            time_refresh=t_refresh,
            time_score=t2 - t1,
            time_update=t3 - t2,
            episodes_per_s=cfg.episodes / (t3 - t0),
            tokens_per_s=n_tokens / (t3 - t0),
            ptx_loss=means.get("ptx_loss"),
        )
        kl_ctl.update(record.kl, cfg.episodes * rt.world_size)
        iterations.append(record)
        metrics.write(record)
        bar.update()
        bar.set_postfix(reward=f"{record.reward:.3f}", kl=f"{record.kl:.2f}")
        if rt.is_main and ((iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations):
            runtime.save_checkpoint(cfg.out, iteration + 1, state, {"kl_coef": kl_ctl.beta})
    bar.close()
    if owns_sampler:
        sampler.close()

    # ---- save ----
    dest = cfg.out / "model"
    adapter = cfg.out / "adapter" if hasattr(runtime.unwrap(policy), "peft_config") else None
    if rt.is_main:
        runtime.save_causal_lm(policy, tokenizer, dest)
        if adapter is not None:
            runtime.save_adapter(policy, adapter)
        log.info("saved the PPO policy to %s%s", dest, f" and its adapter to {adapter}" if adapter else "")
    rt.barrier()
    return PPOResult(dest, iterations, stopped_early, adapter)
