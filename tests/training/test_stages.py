"""The stages take records in memory and return typed results: the saved folder and every step's
metrics (the same ones their metrics.jsonl holds for people and plots). A few steps on the tiny
model each: seconds, no engine."""

from __future__ import annotations

from pathlib import Path

import torch

from training.config import PPOConfig, RMConfig, SFTConfig
from training.data import Comparison, Demonstration
from training.metrics import read_metrics
from training.ppo import PPOResult, train_ppo
from training.reward import RewardModel, RMResult, train_reward_model
from training.sft import SFTResult, train_sft

DEMOS = [Demonstration(f"Question {i}?", f"Answer number {i}.") for i in range(8)]
COMPARISONS = [Comparison(f"Describe day {i}.", ("A sunny, warm day.", "Rain.", "No.")) for i in range(8)]


def test_sft_takes_demonstrations_and_returns_its_folder_and_steps(tmp_path: Path, tiny_model: Path) -> None:
    cfg = SFTConfig(model=str(tiny_model), out=tmp_path / "sft", max_steps=2, batch_size=4, progress=False)

    result = train_sft(cfg, DEMOS, valid=DEMOS[:2])

    assert isinstance(result, SFTResult) and (result.model / "model.safetensors").exists()
    assert [s.step for s in result.steps] == [0, 1, 2]  # step 0: the validation loss before training
    assert result.steps[0].loss is None and all(isinstance(s.loss, float) for s in result.steps[1:])
    assert result.steps[-1].valid_loss is not None
    assert read_metrics(tmp_path / "sft" / "metrics.jsonl") == [s.row() for s in result.steps]


def test_the_reward_model_takes_comparisons_and_returns_its_held_out_accuracy(tmp_path: Path, tiny_model: Path) -> None:
    cfg = RMConfig(model=str(tiny_model), out=tmp_path / "rm", max_steps=2, batch_size=2, progress=False)

    result = train_reward_model(cfg, COMPARISONS[:4], valid=COMPARISONS[4:], reference=DEMOS[:2])

    assert isinstance(result, RMResult) and (result.model / "reward_head.pt").exists()
    assert result.heldout is not None and 0.0 <= result.heldout.accuracy <= 1.0
    assert result.heldout.comparisons == 4 and isinstance(result.heldout.loss, float)
    assert [s.step for s in result.steps] == [1, 2]
    assert result.steps[-1].valid_accuracy == result.heldout.accuracy
    assert read_metrics(tmp_path / "rm" / "metrics.jsonl") == [s.row() for s in result.steps]


def test_an_empty_validation_set_means_no_held_out_accuracy(tmp_path: Path, tiny_model: Path) -> None:
    cfg = RMConfig(model=str(tiny_model), out=tmp_path / "rm", max_steps=1, batch_size=2, progress=False)

    result = train_reward_model(cfg, COMPARISONS[:2], valid=[])

    assert result.heldout is None and result.steps[-1].valid_accuracy is None


def test_ppo_takes_prompts_and_texts_and_returns_every_iteration(tmp_path: Path, tiny_model: Path) -> None:
    torch.manual_seed(0)
    RewardModel.from_causal_lm(tiny_model).save_pretrained(tmp_path / "rm")
    cfg = PPOConfig(
        policy=str(tiny_model),
        reward_model=tmp_path / "rm",
        out=tmp_path / "ppo",
        iterations=2,
        episodes=2,
        minibatch_size=2,
        ppo_epochs=1,
        max_new_tokens=4,
        ptx_coef=0.5,
        ptx_batch_size=2,
        progress=False,
    )

    def length(ids: torch.Tensor, mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        return response_mask.sum(1).float()

    result = train_ppo(cfg, ["Say hi.", "Name a fruit."], ["Some pretraining text here."], scorer=length)

    assert isinstance(result, PPOResult) and (result.model / "model.safetensors").exists()
    assert [i.step for i in result.iterations] == [1, 2] and not result.stopped_early
    last = result.iterations[-1]
    assert last.reward == last.response_length  # the scorer's reward, one answer per episode
    assert last.kl_coef == 0.02 and 0.0 <= last.clipfrac <= 1.0 and last.ptx_loss is not None
    assert read_metrics(tmp_path / "ppo" / "metrics.jsonl") == [i.row() for i in result.iterations]
