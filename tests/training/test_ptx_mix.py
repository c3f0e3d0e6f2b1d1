"""The ptx term's batch (training/ppo.py): a round's corrections make up --ptx-demo-share of it,
each learned on its answer only; the pretraining text (or the logged answers) the rest."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.ppo import ptx_batch, ptx_nll
from training.sft import IGNORE

TEXTS = [[11, 12, 13], [14, 15]]
DEMOS = [([21, 22, 23, 24], [IGNORE, IGNORE, 23, 24])]  # a prompt of 2 tokens, then the answer


def rows(share: float, texts=TEXTS, demos=DEMOS, size: int = 64) -> list[tuple[list[int], list[int]]]:
    ids, mask, labels = ptx_batch(texts, demos, size, share, 0, random.Random(0))
    n = mask.sum(1).tolist()
    return [(ids[i, : n[i]].tolist(), labels[i, : n[i]].tolist()) for i in range(size)]


def test_a_demonstration_in_the_mix_is_learned_on_its_answer_and_a_text_on_all_of_it() -> None:
    assert set(map(str, rows(1.0))) == {str(DEMOS[0])}
    texts = rows(0.0)
    assert all(labels == ids and ids in TEXTS for ids, labels in texts)
    assert {tuple(ids) for ids, _ in texts} == {tuple(t) for t in TEXTS}


def test_the_demonstrations_make_up_their_share_and_either_kind_alone_fills_the_batch() -> None:
    demos = sum(ids == DEMOS[0][0] for ids, _ in rows(0.25, size=2000))
    assert 440 < demos < 560  # 500 expected; 0.25 of 2,000 draws, about 5 standard deviations each side
    assert all(ids == DEMOS[0][0] for ids, _ in rows(0.0, texts=[]))  # no text: demonstrations only
    assert all(ids in TEXTS for ids, _ in rows(1.0, demos=[]))  # no demonstration: text only
    ids, mask, labels = ptx_batch(TEXTS, DEMOS, 3, 1.0, 0, random.Random(0))
    assert labels.shape == ids.shape and bool((labels[mask == 0] == IGNORE).all())  # padding labels nothing


def test_the_ptx_loss_counts_only_the_labelled_tokens(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    ids, mask, labels = ptx_batch([], DEMOS, 1, 1.0, 0, random.Random(0))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0].float()
        answer = F.cross_entropy(logits[1:3], torch.tensor([23, 24]))  # the answer's tokens, from their left
        whole = F.cross_entropy(logits[:3], torch.tensor([22, 23, 24]))
        assert float(ptx_nll(model, (ids, mask, labels))) == pytest.approx(float(answer), rel=1e-5)
        assert float(ptx_nll(model, (ids, mask))) == pytest.approx(float(whole), rel=1e-5)
        assert float(answer) != pytest.approx(float(whole), rel=1e-3)


def test_a_demo_share_of_0_keeps_the_corrections_out_of_the_mix(tiny_model: Path, tmp_path: Path) -> None:
    """With no pretraining text, corrections alone could fill the mix: at a share of 0 they may not,
    so PPO-ptx has nothing to mix and says so before any model loads."""
    from training.config import PPOConfig
    from training.data import Demonstration
    from training.ppo import train_ppo

    cfg = PPOConfig(policy=str(tiny_model), reward_model=tmp_path / "no-reward-model", ptx_coef=1.0)
    demos = [Demonstration("Say hi.", "Hi.")]
    with pytest.raises(ValueError, match="needs --ptx-data"):
        train_ppo(replace(cfg, ptx_demo_share=0.0), ["Say hi."], [], demonstrations=demos)
    with pytest.raises(OSError, match="no-reward-model"):  # above 0 the corrections are the mix: on to the models
        train_ppo(replace(cfg, ptx_demo_share=0.5), ["Say hi."], [], demonstrations=demos)


def test_a_rounds_ppo_inputs_are_its_prompts_and_logged_answers_and_corrections_sampled_by_its_seed() -> None:
    """The round's PPO trains on a seeded sample of its prompts; PPO-ptx's mix is the logged answers
    and the corrections, each sampled the same way; with neither, plain PPO (the coefficient 0)."""
    from training.builders import EventLogData
    from training.config import PPOConfig, TrainerConfig
    from training.data import Demonstration
    from training.round import ppo_inputs

    data = EventLogData(
        prompts=[f"prompt {i}" for i in range(30)],  # a plain prompt stands in for a served one
        texts=[f"answer {i}" for i in range(30)],
        demonstrations=[Demonstration(f"prompt {i}", f"better {i}") for i in range(12)],
    )
    cfg = TrainerConfig(ppo_max_examples=10, ppo=PPOConfig(ptx_coef=2.0))
    first, again, other = ppo_inputs(cfg, data, 1), ppo_inputs(cfg, data, 1), ppo_inputs(cfg, data, 2)
    assert len(first.prompts) == len(first.texts) == len(first.demonstrations) == 10
    assert set(first.prompts) < set(data.prompts) and set(first.texts) < set(data.texts)
    assert {d.response for d in first.demonstrations} < {d.response for d in data.demonstrations}
    assert first == again and first.prompts != other.prompts  # by the seed
    assert first.ptx == 2.0
    few = EventLogData(prompts=data.prompts[:4], texts=data.texts[:4])
    assert ppo_inputs(cfg, few, 1).prompts == data.prompts[:4]  # fewer than the limit: all, in order

    without = replace(cfg, ppo=replace(cfg.ppo, ptx_demo_share=0.0))
    assert ppo_inputs(without, data, 1).demonstrations == []
    empty = EventLogData(prompts=data.prompts)
    assert ppo_inputs(cfg, empty, 1).ptx == 0.0  # nothing to mix: plain PPO
    plain = replace(cfg, ppo=replace(cfg.ppo, ptx_coef=0.0))
    assert ppo_inputs(plain, data, 1) == replace(first, texts=[], demonstrations=[], ptx=0.0)  # the same prompts


def test_negative_coefficients_are_refused_before_models_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A negative KL or ptx coefficient turns a penalty into a bonus: `heed train ppo` refuses it
    before any model loads, and a trainer before it takes the log's lock or creates its folder."""
    from training.config import PPOConfig, TrainerConfig
    from training.ppo import train_ppo
    from training.trainer import run_trainer

    cfg = PPOConfig(policy="no-such-policy", reward_model=tmp_path / "no-reward-model")
    assert cfg.problems() == []
    with pytest.raises(ValueError, match=r"--ptx-coef must be 0 or more; got -1"):
        train_ppo(replace(cfg, ptx_coef=-1.0), ["Say hi."])
    bad = replace(cfg, kl_coef=-0.02, ptx_demo_share=1.5, episodes=0)
    assert bad.problems() == [
        "--kl-coef must be 0 or more; got -0.02",
        "--ptx-demo-share must be from 0 to 1; got 1.5",
        "--episodes must be at least 1; got 0",
    ]
    assert replace(cfg, ptx_coef=float("nan")).problems() == ["--ptx-coef must be 0 or more; got nan"]
    trainer = TrainerConfig(data_dir=tmp_path / "data", once=True)
    assert run_trainer(replace(trainer, ppo=replace(trainer.ppo, kl_coef=-0.02))) == 2
    assert "--kl-coef must be 0 or more" in caplog.text
    assert run_trainer(replace(trainer, max_kl=-1.0)) == 2  # a round's PPO stops at it
    assert "--max-kl must be 0 or more; got -1" in caplog.text
    for z in (-1.0, float("inf")):
        assert run_trainer(replace(trainer, rm_accuracy_z=z)) == 2
        assert f"--rm-accuracy-z must be a number from 0; got {z:g}" in caplog.text
    assert not (tmp_path / "data").exists()
