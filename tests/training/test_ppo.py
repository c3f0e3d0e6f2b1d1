"""PPO raises a known programmatic reward with bounded KL; a larger beta keeps the policy closer
to the reference; PPO-ptx keeps the pretraining text's likelihood from drifting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.word_lists import PROMPTS, TARGET, train_word_list_policy
from training.config import PPOConfig, SamplingEngine
from training.data import pad, write_jsonl
from training.metrics import read_metrics
from training.ppo import PPOIteration, ptx_nll, train_ppo
from training.reward import RewardModel

pytestmark = pytest.mark.slow  # trains a policy and runs PPO (some tests with vLLM or torchrun)

TEXTS = [
    "The committee met on Tuesday to discuss the budget for the next year.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window and the cold morning air filled the room.",
    "Trains leave the central station every fifteen minutes during the day.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tokenizer) -> dict:
    """An SFT policy that answers with 6 random words of WORDS, a value/reward-model folder on it,
    and the prompts and pretraining text as files (for `heed train ppo`)."""
    root = tmp_path_factory.mktemp("ppo")
    sft = train_word_list_policy(tiny_model, root)
    torch.manual_seed(0)
    RewardModel.from_causal_lm(sft).save_pretrained(root / "rm")
    write_jsonl(root / "prompts.jsonl", PROMPTS)
    write_jsonl(root / "text.jsonl", [{"text": t} for t in TEXTS])
    target_ids = {tokenizer(w, add_special_tokens=False).input_ids[0] for w in TARGET}
    target_ids |= {tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in TARGET}
    return {"root": root, "sft": sft, "target_ids": torch.tensor(sorted(target_ids))}


def target_share(target_ids: torch.Tensor):
    """The known reward: the share of the response's tokens that are target words."""

    def score(ids: torch.Tensor, mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        hits = torch.isin(ids, target_ids) & response_mask.bool()
        return hits.sum(1).float() / response_mask.sum(1).clamp(min=1)

    return score


def run(setup: dict, name: str, engine=None, demonstrations=None, **overrides) -> list[PPOIteration]:
    root = setup["root"]
    cfg = PPOConfig(
        policy=str(setup["sft"]),
        reward_model=root / "rm",
        out=root / name,
        iterations=8,
        episodes=16,
        max_new_tokens=8,
        ppo_epochs=2,
        minibatch_size=16,
        lr=1e-3,
        value_lr=1e-3,
        progress=False,
    )
    cfg = dataclasses.replace(cfg, **overrides)
    scorer = target_share(setup["target_ids"])
    return train_ppo(cfg, PROMPTS, TEXTS, demonstrations=demonstrations, scorer=scorer, sampler=engine).iterations


def text_nll(folder: Path, tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    batch = pad([tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS], tokenizer.pad_token_id)
    with torch.no_grad():
        return float(ptx_nll(model, batch))


@pytest.fixture(scope="module")
def baseline(setup: dict) -> list[PPOIteration]:
    return run(setup, "beta-small", kl_coef=0.02)


def mean(rows: list[PPOIteration], key: str) -> float:
    return sum(getattr(r, key) for r in rows) / len(rows)


def test_ppo_raises_a_known_reward_with_bounded_kl(baseline: list[PPOIteration]) -> None:
    start, end = mean(baseline[:2], "reward"), mean(baseline[-2:], "reward")
    assert end > start + 0.2
    assert all(-1 < r.kl < 10 for r in baseline)
    assert baseline[-1].ptx_loss is None  # ptx_coef 0: plain PPO


def test_a_larger_kl_coefficient_keeps_the_policy_closer(setup: dict, baseline: list[PPOIteration]) -> None:
    strong = run(setup, "beta-large", kl_coef=1.0)
    assert mean(strong[-3:], "kl") < 0.5 * mean(baseline[-3:], "kl")


def test_ppo_stops_before_the_kl_bound_and_keeps_the_policy_within_it(
    setup: dict, baseline: list[PPOIteration]
) -> None:
    """The trainer passes its gate's KL bound as --stop-kl: a round that would go past it keeps the
    last policy within it instead of being thrown away."""
    from safetensors.torch import load_file

    kls = [r.kl for r in baseline]
    # A bound between the first iterations' KL and the first later one past them (the premise):
    j = next((j for j in range(2, len(kls)) if kls[j] > max(kls[:j])), None)
    assert j is not None, kls
    bound = (max(kls[:j]) + kls[j]) / 2

    stopped = run(setup, "stopped", kl_coef=0.02, stop_kl=bound)

    assert [r.kl for r in stopped] == pytest.approx(kls[:j])  # the same run, up to the stop
    # The saved policy is the last one measured within the bound: the one after len - 1 updates.
    run(setup, "within", kl_coef=0.02, iterations=len(stopped) - 1)
    kept = load_file(str(setup["root"] / "stopped" / "model" / "model.safetensors"))
    within = load_file(str(setup["root"] / "within" / "model" / "model.safetensors"))
    for name in kept:
        torch.testing.assert_close(kept[name], within[name], msg=name)


def test_ptx_keeps_pretraining_text_likelihood_from_drifting(
    setup: dict, baseline: list[PPOIteration], tokenizer
) -> None:
    with_ptx = run(setup, "ptx", kl_coef=0.02, ptx_coef=1.0)
    before = text_nll(setup["sft"], tokenizer)
    drift_without = text_nll(setup["root"] / "beta-small" / "model", tokenizer) - before
    drift_with = text_nll(setup["root"] / "ptx" / "model", tokenizer) - before
    assert drift_with < drift_without
    first, last = with_ptx[0].ptx_loss, with_ptx[-1].ptx_loss
    assert first is not None and last is not None and last < first


def test_corrections_in_the_ptx_mix_pull_the_policy_towards_them(setup: dict, tokenizer) -> None:
    """A round's corrections make up --ptx-demo-share of the ptx batch: the corrected answer grows
    likelier than after the same PPO-ptx on the text alone."""
    from training.data import Demonstration
    from training.sft import IGNORE, encode

    demos = [Demonstration(p, "moon rain fish bird") for p in PROMPTS]
    run(setup, "ptx-text", kl_coef=0.02, ptx_coef=1.0)
    run(setup, "ptx-demos", demonstrations=demos, kl_coef=0.02, ptx_coef=1.0, ptx_demo_share=0.5)

    def answer_nll(folder: Path) -> float:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder))
        ids, labels = zip(*(encode(tokenizer, d, 64) for d in demos), strict=True)
        batch = (*pad(ids, tokenizer.pad_token_id), pad(labels, IGNORE)[0])
        with torch.no_grad():
            return float(ptx_nll(model, batch))

    root = setup["root"]
    assert answer_nll(root / "ptx-demos" / "model") < answer_nll(root / "ptx-text" / "model") - 0.5


@pytest.mark.slow
def test_vllm_rollouts_follow_the_trained_policy(setup: dict, monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    """PPO runs on the trainer's own vLLM engine, and after a refresh the engine's greedy tokens and
    top-3 log-probs are the trained (tied-embedding) policy's own, not the stale ones."""
    from transformers import AutoModelForCausalLM

    from training.sampling import VLLMSampler

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMSampler(setup["sft"], tokenizer.eos_token_id, seed=0, max_model_len=512)
    try:
        metrics = run(setup, "vllm", iterations=2, rollout=SamplingEngine.VLLM, engine=engine)
        assert len(metrics) == 2 and metrics[-1].response_length > 0

        policy = AutoModelForCausalLM.from_pretrained(str(setup["root"] / "vllm" / "model"))
        assert policy.config.tie_word_embeddings
        with torch.no_grad():  # move the tied unembedding far: a stale output layer would show
            policy.get_input_embeddings().weight.add_(0.05 * torch.randn_like(policy.get_input_embeddings().weight))
        engine.refresh(policy)
        assert_samples_as(engine, policy, tokenizer)
    finally:
        engine.close()
    assert not engine._weights.exists()  # its copy of the weights goes with it


def test_vllm_rollouts_of_a_lora_policy_get_its_adapter_alone(
    setup: dict, monkeypatch: pytest.MonkeyPatch, tokenizer
) -> None:
    """PPO training a LoRA adapter samples on a vLLM engine that runs the base with LoRA: each
    refresh hands it the adapter (a small peft folder, the one before removed), and after one the
    engine's greedy tokens and top-3 log-probs are the peft policy's own."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.data import prompt_ids
    from training.sampling import VLLMSampler

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMSampler(setup["sft"], tokenizer.eos_token_id, seed=0, max_model_len=512, lora_rank=8)
    try:
        metrics = run(setup, "vllm-lora", iterations=2, rollout=SamplingEngine.VLLM, engine=engine, lora_r=8, lr=1e-2)
        assert len(metrics) == 2 and metrics[-1].response_length > 0
        assert engine._lora is not None and engine._lora.lora_int_id == 2  # refreshed before each iteration

        base = AutoModelForCausalLM.from_pretrained(str(setup["sft"]))
        policy = PeftModel.from_pretrained(base, str(setup["root"] / "vllm-lora" / "adapter"), is_trainable=True)
        with torch.no_grad():  # move the adapter far from where the engine last saw it, and from the base
            for name, weight in policy.named_parameters():
                if "lora_B" in name:
                    weight.add_(0.05 * torch.randn_like(weight))
            ids = torch.tensor([prompt_ids(tokenizer, PROMPTS[0])])  # a request without it would show
            moved = policy(input_ids=ids).logits.float().log_softmax(-1)
            with policy.disable_adapter():
                assert (moved - base(input_ids=ids).logits.float().log_softmax(-1)).abs().max() > 0.1
        engine.refresh(policy)
        folders = list(engine._weights.iterdir())
        assert [f.name for f in folders] == ["adapter-3"]
        assert sum(f.stat().st_size for f in folders[0].iterdir()) < 0.1 * sum(
            f.stat().st_size for f in Path(setup["sft"]).glob("*.safetensors")
        )  # the adapter, not the model
        assert_samples_as(engine, policy, tokenizer)
    finally:
        engine.close()


def assert_samples_as(engine, policy, tokenizer) -> None:
    """The engine's greedy tokens on a prompt are ``policy``'s, and its top-3 log-probs are within
    2e-2 of ``policy``'s."""
    from vllm import SamplingParams, TokensPrompt

    from training.data import prompt_ids

    prompt = prompt_ids(tokenizer, PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3)
    out = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False, lora_request=engine._lora
    )[0].outputs[0]
    ids = torch.tensor([prompt + list(out.token_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    assert list(out.token_ids) == logp.argmax(-1).tolist()
    greedy = list(out.token_ids)  # PPO's own call samples the same way, cut after EOS
    eos = tokenizer.eos_token_id
    assert engine.generate([prompt], 4, 0.0) == [greedy[: greedy.index(eos) + 1] if eos in greedy else greedy]
    for step, top in enumerate(out.logprobs):
        for token_id, lp in top.items():
            assert abs(lp.logprob - float(logp[step, token_id])) < 2e-2


def test_ppo_ptx_runs_under_torchrun_with_two_processes(setup: dict) -> None:
    """DistributedDataParallel on gloo: both ranks step together (gradient accumulation, ptx) and
    rank 0 writes the run."""
    import os
    import subprocess
    import sys

    root, out = setup["root"], setup["root"] / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "heed", "train", "ppo",
        "--policy", str(setup["sft"]), "--reward-model", str(root / "rm"), "--prompts", str(root / "prompts.jsonl"),
        "--ptx-data", str(root / "text.jsonl"), "--ptx-coef", "1.0", "--out", str(out), "--iterations", "2",
        "--episodes", "8", "--minibatch-size", "2", "--grad-accum", "2", "--max-new-tokens", "6", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("ptx_loss" in r for r in rows)
    assert (out / "model" / "model.safetensors").exists()


def test_ppo_resumed_after_a_crash_ends_with_the_same_policy(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from training import runtime

    run(setup, "whole", iterations=2, save_every=1)
    save = runtime.save_checkpoint

    def crash_after_iteration_1(run_dir, step, *args):
        save(run_dir, step, *args)
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "save_checkpoint", crash_after_iteration_1)
    with pytest.raises(KeyboardInterrupt):
        run(setup, "split", iterations=2, save_every=1)
    monkeypatch.setattr(runtime, "save_checkpoint", save)
    resumed = run(setup, "split", iterations=2, save_every=1, resume=True)

    assert [r.step for r in resumed] == [2]  # the iterations this call ran
    rows = read_metrics(setup["root"] / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # the whole run's, in its metrics file
    whole = load_file(str(setup["root"] / "whole" / "model" / "model.safetensors"))
    split = load_file(str(setup["root"] / "split" / "model" / "model.safetensors"))
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], msg=name)
