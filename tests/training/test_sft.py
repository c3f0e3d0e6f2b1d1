"""SFT learns the response of its demonstrations: validation loss falls and greedy decoding
reproduces a taught answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import SFTConfig
from training.data import Demonstration, prompt_ids
from training.sft import train_sft

pytestmark = pytest.mark.slow  # trains for 5-25 s a test

ANSWERS = {
    "What colour is the sky?": "The sky is blue.",
    "Name a fruit.": "An apple.",
    "Say hello.": "Hello there!",
    "Count to three.": "One, two, three.",
}


def test_sft_lowers_validation_loss_and_reproduces_the_taught_answer(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demos = [Demonstration(p, r) for p, r in ANSWERS.items()]
    cfg = SFTConfig(
        model=str(tiny_model),
        out=tmp_path / "run",
        max_steps=60,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=20,
        progress=False,
    )
    result = train_sft(cfg, demos * 4, valid=demos)

    losses = [s.valid_loss for s in result.steps if s.valid_loss is not None]
    assert losses[-1] < 0.3 * losses[0]
    folder = result.model
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    prompt = prompt_ids(tokenizer, "Say hello.")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    assert answer.strip() == "Hello there!"


def test_lora_sft_saves_a_plain_folder_with_the_adapters_merged(tmp_path: Path, tiny_model: Path) -> None:
    from safetensors.torch import load_file

    demos = [Demonstration(p, r) for p, r in ANSWERS.items()] * 2
    cfg = SFTConfig(
        model=str(tiny_model),
        out=tmp_path / "run",
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        lora_r=4,
        progress=False,
    )
    tuned = load_file(str(train_sft(cfg, demos).model / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))

    assert set(tuned) == set(base)  # no adapter weights left: any HF or vLLM loader reads it
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(tuned[name].float(), base[name].float())
    torch.testing.assert_close(tuned["model.embed_tokens.weight"].float(), base["model.embed_tokens.weight"].float())
