"""`heed model prepare`: the bundled GGUF becomes a working Hugging Face folder, once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # converts the bundled model (about 30 s) and generates with it


def test_prepare_writes_a_bf16_safetensors_folder_with_tokenizer_and_chat_template(prepared_bundled) -> None:
    _, folder, output = prepared_bundled

    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(folder))
    assert "preparing SmolLM2-135M-Instruct" in output  # visible progress
    assert not list(folder.parent.glob(".tmp-*"))  # published atomically, nothing left aside


def test_the_prepared_model_answers_coherently(prepared_bundled) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _ = prepared_bundled
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    assert model.config.tie_word_embeddings and model.num_parameters() == 134_515_008
    assert "Paris" in answer


def test_prepare_again_is_a_quick_no_op(prepared_bundled) -> None:
    cache, folder, _ = prepared_bundled
    mtime = (folder / "model.safetensors").stat().st_mtime
    started = time.monotonic()

    result = subprocess.run(
        [sys.executable, "-m", "heed", "model", "prepare", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0 and "is ready" in result.stdout
    assert (folder / "model.safetensors").stat().st_mtime == mtime
    assert time.monotonic() - started < 30
