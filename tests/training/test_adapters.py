"""Policy versions as LoRA adapters (issue 16): the registry keeps an adapter on its base, and
`heed registry merge` turns it into a full version whose model is the adapter applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heed.cli import main
from heed.registry import PolicyRegistry
from training.runtime import add_lora, load_causal_lm


def random_adapter(base: Path, dest: Path, r: int = 8, seed: int = 1) -> Path:
    """A peft LoRA adapter on ``base`` with random nonzero B, so it moves the model."""
    torch.manual_seed(seed)
    model = add_lora(load_causal_lm(base, trainable=True), r)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(dest)
    return dest


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_heed_registry_merge_publishes_the_adapters_full_weight_model(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel

    data = tmp_path / "data"
    registry = PolicyRegistry(data / "registry")
    registry.import_base(tiny_model, "tiny-v1")
    adapter = random_adapter(tiny_model, tmp_path / "adapter")
    v2 = registry.publish(adapter, mode="adapter", base="tiny-v1", parent="tiny-v1", watermark=17, source="trainer")
    assert v2.adapter["r"] == 8 and len(v2.adapter["target_modules"]) == 7

    with pytest.raises(SystemExit) as exit_:
        main(["registry", "merge", "v2", "--data-dir", str(data)])
    assert exit_.value.code == 0
    assert "published v3" in capsys.readouterr().out
    v3 = registry.manifest("v3")
    assert (v3.mode, v3.parent, v3.watermark, v3.data["merged_from"]) == ("full", "v2", 17, "v2")
    folder = registry.verify("v3")
    assert not (folder / "adapter_config.json").exists() and (folder / "tokenizer.json").is_file()

    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    base = load_causal_lm(tiny_model, trainable=False)
    with_adapter = PeftModel.from_pretrained(load_causal_lm(tiny_model, trainable=False), str(registry.root / "v2"))
    merged = load_causal_lm(folder, trainable=False)
    assert (logits(with_adapter, ids) - logits(base, ids)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits(merged, ids), logits(with_adapter, ids), atol=1e-4, rtol=0)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True

    # Merging a full version is refused with one line, and nothing is published.
    with pytest.raises(SystemExit) as exit_:
        main(["registry", "merge", "v3", "--data-dir", str(data)])
    assert exit_.value.code == 2
    assert "already a full version" in capsys.readouterr().err
    assert [m.version for m in registry.versions()] == ["tiny-v1", "v2", "v3"]


def test_ppo_with_lora_saves_its_adapter_and_a_warm_start_continues_it(tmp_path: Path, tiny_model: Path) -> None:
    """A LoRA PPO run saves the adapter alone (what the registry publishes as an adapter version);
    a run started from it trains the same adapter on (same rank), and its KL reference is where
    it started: the first iteration's KL is 0, where a fresh LoRA against the base would not be."""
    from training.config import PPOConfig
    from training.ppo import train_ppo
    from training.reward import RewardModel

    torch.manual_seed(0)
    RewardModel.from_causal_lm(tiny_model).save_pretrained(tmp_path / "rm")
    prompts = [f"Say something about the number {n}." for n in range(8)]

    def score(ids: torch.Tensor, mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        even = (ids % 2 == 0) & response_mask.bool()  # a reward the random model gets half of
        return even.sum(1).float() / response_mask.sum(1).clamp(min=1)

    common = dict(policy=str(tiny_model), reward_model=tmp_path / "rm", iterations=3, episodes=8, max_new_tokens=6)
    # fp32 on every host: under bf16 autocast (a CPU with native bf16) the adapter's path and the
    # merged reference round differently, and the first KL was 1.7e-3 instead of about 0
    common |= dict(minibatch_size=8, lr=1e-3, value_lr=1e-3, progress=False, bf16=False)
    first = train_ppo(PPOConfig(**common, out=tmp_path / "r1", lora_r=4), prompts, scorer=score)  # type: ignore[arg-type]
    assert first.adapter == tmp_path / "r1" / "adapter"
    assert sorted(p.name for p in first.adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((first.adapter / "adapter_config.json").read_text())["r"] == 4
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    base = logits(load_causal_lm(tiny_model, trainable=False), ids)
    assert (logits(load_causal_lm(first.model, trainable=False), ids) - base).abs().max() > 1e-3  # it moved

    second = train_ppo(
        PPOConfig(**common, out=tmp_path / "r2", init_adapter=first.adapter),  # type: ignore[arg-type]
        prompts,
        scorer=score,
    )
    assert abs(second.iterations[0].kl) < 1e-4  # its reference is the base with the first adapter, not the base
    assert second.adapter is not None
    assert json.loads((second.adapter / "adapter_config.json").read_text())["r"] == 4
    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(tiny_model, "tiny-v1")
    v2 = registry.publish(second.adapter, mode="adapter", base="tiny-v1")
    assert v2.adapter["r"] == 4

    # The saved full model is the base with the second adapter applied.
    from training.runtime import merged_lora

    torch.testing.assert_close(
        logits(load_causal_lm(second.model, trainable=False), ids),
        logits(merged_lora(tiny_model, second.adapter), ids),
        atol=1e-4,
        rtol=0,
    )


def vllm_engine(model: Path, **lora: object):
    from vllm import LLM

    return LLM(model=str(model), enforce_eager=True, seed=0, max_model_len=256, dtype="float32", **lora)  # type: ignore[arg-type]


def prompt_logprobs(llm, prompts: list[list[int]], loras: list | None = None) -> list[list[float]]:
    """Each prompt's log-probs of its own tokens after the first, as the engine computes them."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=loras, use_tqdm=False)
    rows = []
    for out, prompt in zip(outs, prompts, strict=True):
        rows.append([top[t].logprob for top, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)])
    return rows


def greedy(llm, prompts: list[list[int]], loras: list | None = None) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row, ref in zip(a, b, strict=True) for x, y in zip(row, ref, strict=True))


def hf_logprobs(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[float]]:
    rows = []
    for p in prompts:
        ids = torch.tensor([p])
        logp = torch.log_softmax(logits(model, ids)[0, :-1].float(), -1)
        rows.append(logp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return rows


@pytest.mark.slow  # two vLLM engines
@pytest.mark.parametrize("which", ["tiny", "bundled"])
def test_vllm_serves_an_adapter_as_peft_applies_it_and_as_the_merged_model(
    tmp_path: Path, which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16's correctness: on a tied-embedding model (the tiny random one, and the bundled
    SmolLM2-135M-Instruct as `heed model prepare` makes it), an adapter served by vLLM's LoRA engine
    gives the log-probs of the HF model with the peft adapter applied, and of the merged model in a
    fresh engine without LoRA; greedy answers agree; in one batch with the base and another adapter,
    every request is answered by its own version."""
    from peft import PeftModel
    from vllm.lora.request import LoRARequest

    from heed.models import identity_adapter
    from heed.registry import ADAPTER_TARGETS
    from training.runtime import merge_adapter

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model = request.getfixturevalue("tiny_model" if which == "tiny" else "bundled_model")
    assert json.loads((model / "config.json").read_text())["tie_word_embeddings"]
    a = random_adapter(model, tmp_path / "a", seed=1)
    b = random_adapter(model, tmp_path / "b", seed=2)
    merged = merge_adapter(model, a, tmp_path / "merged")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (6, 9, 12, 15, 10, 7)]

    peft_a = hf_logprobs(PeftModel.from_pretrained(load_causal_lm(model, trainable=False), str(a)), prompts)
    base = hf_logprobs(load_causal_lm(model, trainable=False), prompts)
    moved = max_gap(peft_a, base)
    assert moved > 1e-2  # the adapter changes the answers: the comparisons below can fail

    lora = dict(enable_lora=True, max_lora_rank=8, max_loras=2, max_cpu_loras=3)
    llm = vllm_engine(model, **lora, lora_target_modules=sorted(ADAPTER_TARGETS))
    try:
        req_a, req_b = LoRARequest("v2", 1, str(a)), LoRARequest("v3", 2, str(b))
        served_a = prompt_logprobs(llm, prompts, [req_a] * len(prompts))
        greedy_a = greedy(llm, prompts, [req_a] * len(prompts))
        # The base as a LoRA request too (an adapter of zeros): a request without one, in a batch
        # with adapters, is decoded with another adapter's weights by vLLM 0.32's CPU LoRA ops.
        req_base = LoRARequest("base", 3, str(identity_adapter(model, tmp_path / "identity", 8, ADAPTER_TARGETS)))
        solo = {
            "base": greedy(llm, prompts[:2]),
            "v3": greedy(llm, prompts[2:4], [req_b] * 2),
        }
        mixed = greedy(llm, prompts, [req_base, req_base, req_b, req_b, req_a, req_a])  # one batch, three versions
        base_logprobs = prompt_logprobs(llm, prompts, [req_base] * len(prompts))
    finally:
        del llm
    gap = max_gap(served_a, peft_a)
    print(f"{which}: the adapter moves log-probs by up to {moved:.3f}; vLLM's LoRA engine against HF+peft {gap:.2e}")
    assert gap < 1e-4, f"vLLM's LoRA engine against HF+peft: max |Δ log-prob| {gap:.2e}"
    assert mixed[:2] == solo["base"] and mixed[2:4] == solo["v3"] and mixed[4:] == greedy_a[4:]
    assert max_gap(base_logprobs, base) < 1e-4  # the identity adapter is the base

    llm = vllm_engine(merged)
    try:
        merged_logprobs = prompt_logprobs(llm, prompts)
        merged_greedy = greedy(llm, prompts)
    finally:
        del llm
    gap = max_gap(merged_logprobs, served_a)
    print(f"{which}: the merged model in a fresh engine against the adapter {gap:.2e}")
    assert gap < 1e-4, f"the merged model in a fresh engine against the adapter: max |Δ log-prob| {gap:.2e}"
    assert merged_greedy == greedy_a
