"""Engines that share a node's GPUs: the stable slot, the warm canary slot and the co-located
trainer's rollout engine each take a share of every GPU they run on (vLLM's
``gpu_memory_utilization``: the fraction of a GPU's memory one engine may use for its weights,
activations and KV cache). vLLM's own default, 0.92, is for an engine alone: two of them on one
GPU do not start. Each engine here has its own share, and their sum must leave room for what is
not an engine's: a CUDA context per process and the trainer's own training step.

Every engine of a node starts on its first GPUs (a slot with tensor_parallel_size N on GPUs
0..N-1), so GPU 0 holds every share: the check adds them all up. On a CPU the shares are not used
(vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE); they are checked all the same,
so that a configuration fails where it is written, not on the first GPU it meets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The part of each GPU's memory left to what is not an engine's share.
HEADROOM = 0.05


@dataclass(frozen=True)
class GpuShare:
    """One engine's claim on the node's GPUs: who it is (and the setting that sets it), its
    share of each GPU's memory, and how many GPUs it spans."""

    engine: str
    setting: str
    memory_fraction: float
    tensor_parallel_size: int = 1


def gpu_count() -> int:
    """The CUDA devices this process sees (0 on a machine without them, or without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu_shares(shares: Sequence[GpuShare], gpus: int, headroom: float = HEADROOM) -> None:
    """Raise ValueError, saying which settings to change, unless ``shares`` fit together on a
    node with ``gpus`` GPUs (0: no GPU, where only the arithmetic is checked)."""
    for share in shares:
        if not 0 < share.memory_fraction <= 1:
            raise ValueError(
                f"{share.setting} must be above 0 and at most 1 (a share of each GPU's memory); "
                f"got {share.memory_fraction}"
            )
        if share.tensor_parallel_size < 1:
            raise ValueError(f"the {share.engine}'s tensor_parallel_size must be at least 1")
        if gpus and share.tensor_parallel_size > gpus:
            raise ValueError(
                f"the {share.engine} asks for tensor_parallel_size {share.tensor_parallel_size}, "
                f"but this node has {gpus} GPU{'s' * (gpus != 1)}"
            )
    total = sum(share.memory_fraction for share in shares)
    if total > 1 - headroom + 1e-9:
        parts = " + ".join(f"{share.engine} {share.memory_fraction:g} ({share.setting})" for share in shares)
        raise ValueError(
            f"the engines' shares of a GPU's memory add up to {total:.2f} ({parts}), and at most "
            f"{1 - headroom:.2f} fits beside CUDA's own use: lower one of them"
        )
