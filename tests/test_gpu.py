"""The engines' shares of a GPU (heed/gpu.py): the arithmetic and the errors, checked on the CPU
(the GPU path itself needs a GPU: docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from heed.gpu import GpuShare, check_gpu_shares
from serving.config import ServeConfig
from serving.engine import EngineSettings
from serving.service import engine_settings, gpu_shares
from tests.conftest import run_heed


def test_the_default_shares_fit_one_gpu_with_the_trainer_beside_the_slots() -> None:
    shares = gpu_shares(ServeConfig(with_trainer=True))
    assert [s.engine for s in shares] == ["stable slot", "canary slot", "trainer's rollout engine"]
    assert sum(s.memory_fraction for s in shares) <= 0.95
    check_gpu_shares(shares, gpus=1)  # raises nothing
    assert len(gpu_shares(ServeConfig())) == 2  # without the trainer its engine claims nothing


def test_shares_that_do_not_fit_are_refused_naming_every_setting() -> None:
    shares = [
        GpuShare("stable slot", "--gpu-memory-utilization", 0.6),
        GpuShare("canary slot", "--canary-gpu-memory-utilization", 0.4),
    ]
    with pytest.raises(ValueError) as refused:
        check_gpu_shares(shares, gpus=1)
    message = str(refused.value)
    assert "add up to 1.00" in message and "at most 0.95" in message
    assert "stable slot 0.6 (--gpu-memory-utilization) + canary slot 0.4 (--canary-gpu-memory-utilization)" in message
    check_gpu_shares([*shares[:1], GpuShare("canary slot", "--canary-gpu-memory-utilization", 0.35)], gpus=1)


@pytest.mark.parametrize(
    ("share", "gpus", "says"),
    [
        (GpuShare("stable slot", "--gpu-memory-utilization", 0.0), 1, "--gpu-memory-utilization must be above 0"),
        (GpuShare("stable slot", "--gpu-memory-utilization", 1.5), 0, "at most 1"),
        (
            GpuShare("stable slot", "--gpu-memory-utilization", 0.4, 4),
            2,
            "tensor_parallel_size 4, but this node has 2 GPUs",
        ),
        (GpuShare("canary slot", "--canary-gpu-memory-utilization", 0.3, 0), 1, "at least 1"),
    ],
)
def test_a_share_out_of_range_is_named(share: GpuShare, gpus: int, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_gpu_shares([share], gpus)


def test_without_a_gpu_the_span_is_not_checked_but_the_arithmetic_is() -> None:
    check_gpu_shares([GpuShare("stable slot", "--gpu-memory-utilization", 0.4, 8)], gpus=0)
    with pytest.raises(ValueError, match="add up to"):
        check_gpu_shares([GpuShare("a", "--a", 0.5), GpuShare("b", "--b", 0.5)], gpus=0)


def test_each_slot_gets_its_own_share() -> None:
    settings = engine_settings(ServeConfig(gpu_memory_utilization=0.5, canary_gpu_memory_utilization=0.25))
    assert settings.memory_share("stable") == 0.5 and settings.memory_share("canary") == 0.25
    assert EngineSettings().memory_share("canary") == ServeConfig().canary_gpu_memory_utilization
    # Adapter mode's one engine serves stable and canary: it takes stable's share, and only it is checked.
    adapter = ServeConfig(gpu_memory_utilization=0.5, canary_gpu_memory_utilization=0.25, policy_mode="adapter")
    assert engine_settings(adapter).memory_share("engine") == 0.5
    assert [s.engine for s in gpu_shares(adapter)] == ["stable slot"]


def test_serve_with_shares_that_do_not_fit_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_heed(
        tmp_path / "cache",
        "serve",
        "--gpu-memory-utilization",
        "0.7",
        "--canary-gpu-memory-utilization",
        "0.4",
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.strip().splitlines() if x.startswith("heed: error:")]
    assert line.startswith("heed: error: the engines' shares of a GPU's memory add up to 1.10")
    assert not (tmp_path / "data").exists()
