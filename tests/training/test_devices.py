"""The device a training stage runs on (training/runtime.py): what a setting resolves to, the
backend a torchrun job joins over, bf16 by device, and the errors, checked on the CPU (the GPU
path itself needs a GPU: docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.hardware import native_bf16
from training import runtime
from training.config import SFTConfig
from training.data import Demonstration
from training.sft import train_sft

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


def test_auto_is_this_processs_gpu_where_there_is_one_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert runtime.resolve_device("auto") == expected
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_a_clear_error(setting: str) -> None:
    with pytest.raises(ValueError, match=rf"device '{setting}' was asked for, but this machine has no CUDA GPU"):
        runtime.resolve_device(setting)


@pytest.mark.parametrize("setting", ["gpu", "tpu", "mps", "cuda:x", ""])
def test_an_unknown_device_names_the_choices(setting: str) -> None:
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        runtime.resolve_device(setting)


def test_gpus_join_over_nccl_and_cpus_over_gloo() -> None:
    assert runtime.backend_for(torch.device("cuda", 1)) == "nccl"
    assert runtime.backend_for(torch.device("cpu")) == "gloo"


def test_bf16_and_autocast_follow_the_device() -> None:
    cpu = torch.device("cpu")
    assert runtime.use_bf16(None, cpu) == native_bf16()
    assert runtime.use_bf16(False, cpu) is False and runtime.use_bf16(True, cpu) is True
    with runtime.autocast(True, cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_enabled("cuda")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert runtime.Runtime().to_device(batch) is batch  # the CPU's batches stay where they are
    assert runtime.start(0, "cpu").device == cpu


@NO_CUDA
def test_sft_asked_to_run_on_a_gpu_that_is_not_there_stops_before_it_trains(tiny_model: Path, tmp_path: Path) -> None:
    cfg = SFTConfig(model=str(tiny_model), out=tmp_path / "sft", max_steps=1, device="cuda", progress=False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train_sft(cfg, [Demonstration("Hi", "Hello")] * 4)
    assert not (tmp_path / "sft" / "model").exists()
