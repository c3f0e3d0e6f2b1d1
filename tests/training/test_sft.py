"""SFT learns the response of its demonstrations: validation loss falls and greedy decoding
reproduces a taught answer."""

from __future__ import annotations

import json
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


def torchrun_sft(tmp_path: Path, tiny_model: Path, name: str, *flags: str, port: int) -> Path:
    """`heed train sft` under torchrun with two processes on the CPU (gloo); returns the run folder."""
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ANSWERS.items()) * 2)
    out = tmp_path / name
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "heed", "train", "sft",
        "--model", str(tiny_model), "--train", str(data), "--valid-fraction", "0", "--out", str(out),
        "--batch-size", "2", "--lr", "3e-3", "--no-progress", "--seed", "0",
        # a constant learning rate: a run of 2 steps and one of 4 take the same first steps
        "--warmup-steps", "0", "--min-lr-ratio", "1",
        # fp32 on every host: under bf16 autocast (a CPU with native bf16) DDP's and FSDP's losses
        # differed by 2.1e-4, past the 1e-4 the sharding is held to
        "--no-bf16", *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (out / "torchrun.log").write_text(done.stderr)
    return out


def test_fsdp_sharded_sft_trains_as_ddp_does_saves_a_tied_folder_and_resumes(tmp_path: Path, tiny_model: Path) -> None:
    """FSDP2 on two CPU processes: the same steps as DDP's (the same data and seed), a plain
    folder with the output layer tied to the embeddings again, and a run stopped after a
    checkpoint resumed to the uninterrupted run's weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ddp = torchrun_sft(tmp_path, tiny_model, "ddp", "--max-steps", "4", port=29521)
    fsdp = torchrun_sft(tmp_path, tiny_model, "fsdp", "--max-steps", "4", "--sharding", "fsdp", port=29522)
    torchrun_sft(
        tmp_path, tiny_model, "resumed", "--max-steps", "2", "--save-every", "1", "--sharding", "fsdp", port=29523
    )
    resumed = torchrun_sft(
        tmp_path, tiny_model, "resumed", "--max-steps", "4", "--save-every", "1", "--sharding", "fsdp", "--resume",
        port=29524,
    )  # fmt: skip

    assert "at step 2" in (resumed / "torchrun.log").read_text()  # it resumed from the checkpoint of step 2
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (ddp, fsdp)}
    losses = {run: [r["loss"] for r in rows[run] if r.get("loss") is not None] for run in rows}
    assert len(losses[fsdp]) == 4 and max(abs(a - b) for a, b in zip(losses[ddp], losses[fsdp], strict=True)) < 1e-4
    weights = {run: load_file(str(run / "model" / "model.safetensors")) for run in (ddp, fsdp, resumed)}
    assert weights[fsdp].keys() == weights[ddp].keys()
    for key, tensor in weights[ddp].items():
        assert torch.allclose(tensor, weights[fsdp][key], atol=2e-4), key
        assert torch.allclose(weights[fsdp][key], weights[resumed][key], atol=1e-5), key
    model = AutoModelForCausalLM.from_pretrained(str(fsdp / "model"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as saved
    before = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(before[k], weights[fsdp][k]) for k in before)  # it trained
