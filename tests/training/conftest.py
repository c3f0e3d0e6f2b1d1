"""Fixtures for the training tests: one tiny random Llama per session (2 layers, hidden 128)
with the default model's tokenizer, and small synthetic data sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.models import build_tiny_llama, prepared_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return prepared_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random tied-embedding Llama saved as a Hugging Face folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
