"""The optimizer's step on the bundled model: heed's AdamW (torch's fused kernel where it can run,
training/runtime.adamw) against torch's default (on the CPU a loop over the tensors), alone and inside a training step
(forward and backward of 8 sequences of 110 tokens, then the step), in the dtype the trainer
computes in here (fp32 without native bf16: the optimizer's state is fp32 either way).

    .venv/bin/python bench/optimizer.py            # about a minute on 2 cores
    HEED_NATIVE_BF16=0 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/optimizer.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heed.hardware import native_bf16  # noqa: E402
from heed.models import resolve_model  # noqa: E402
from training import runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each kind (after one to warm up)")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(args.model)), dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.randint(10, 1000, (8, 110))
    bf16 = runtime.use_bf16(None)
    rows = {}
    for name in ("torch default (a loop)", "heed (fused where it can run)"):
        opt = (
            torch.optim.AdamW(params, lr=1e-6, eps=1e-5)
            if name.startswith("torch")
            else runtime.adamw(params, lr=1e-6, eps=1e-5)
        )
        step_s, train_s = [], []
        for i in range(args.steps + 1):
            started = time.perf_counter()
            with runtime.autocast(bf16):
                model(input_ids=batch, labels=batch).loss.backward()
            backward_done = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = time.perf_counter()
            if i:  # the first warms up
                step_s.append(done - backward_done)
                train_s.append(done - started)
        rows[name] = {
            "fused": bool(opt.param_groups[0]["fused"]),
            "optimizer_step_s": statistics.median(step_s),
            "training_step_s": statistics.median(train_s),
        }
    flags = Path("/proc/cpuinfo").read_text().split()
    cpu = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    print(
        json.dumps(
            {"parameters": sum(p.numel() for p in params), "bf16_autocast": bf16, "native_bf16": native_bf16(), **cpu}
        )
    )
    print(f"{'AdamW':32} {'fused':>6} {'optimizer step (s)':>19} {'training step (s)':>18}")
    for name, row in rows.items():
        print(f"{name:32} {row['fused']!s:>6} {row['optimizer_step_s']:>19.3f} {row['training_step_s']:>18.2f}")
    base, ours = rows.values()
    print(f"saved a step: {base['optimizer_step_s'] - ours['optimizer_step_s']:.3f} s of {base['training_step_s']:.2f}")


if __name__ == "__main__":
    main()
