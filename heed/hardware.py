"""What the machine can do fast, so both halves pick the same numeric precision."""

from __future__ import annotations

import functools
import os
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")

# vLLM settings for engines on the CPU build, unless the environment sets them. vLLM 0.32 cannot
# load its AOT-compiled model back on the CPU ("'function' object has no attribute
# 'finalize_loading'"), so every engine start compiled the model again (73-80 s for the bundled
# 135M on 2 cores); without AOT compilation vLLM's compile cache is used: a second engine, or a
# restart, starts in 19-21 s.
CPU_ENGINE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}

# Overrides what /proc/cpuinfo says: "0" makes serving and training pick what a host without
# native bf16 gets (fp32), "1" what a host with it gets. For a virtual machine whose flags do not
# tell the truth, and to run this host's loop as a host without native bf16 would.
NATIVE_BF16_ENV = "HEED_NATIVE_BF16"


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it bf16 is
    emulated: on an AVX2-only host a bf16 matmul ran ~60x slower than fp32, and vLLM generated
    4.5x fewer tokens/s in bf16 than in fp32 (docs/benchmarks.md). ``HEED_NATIVE_BF16`` (0 or 1)
    overrides the flags."""
    setting = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if setting:
        if setting not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16_ENV} must be 0 or 1 (or unset: from the CPU's flags); got {setting!r}")
        return setting == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_dtype(setting: str = "auto") -> str:
    """The vLLM ``dtype`` for ``setting``: "auto" keeps the checkpoint's dtype on a GPU or on a
    CPU with native bf16, and means float32 on a CPU without it."""
    if setting not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {setting!r}")
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available() or native_bf16():
        return "auto"
    return "float32"
