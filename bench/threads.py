"""Torch threads beside a busy neighbour: one reward-model training step of the bundled model at
nice 10 (as the co-located trainer runs), with torch's default threads, with 1, and following
the free cores (training/threads.py), quiet and beside a busy loop on one core (what vLLM's CPU
worker does while it serves).

    .venv/bin/python bench/threads.py                 # about 5 minutes on 2 cores
    .venv/bin/python bench/threads.py --steps 2 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import json, os, sys, time
import torch
from transformers import AutoModelForSequenceClassification
sys.path.insert(0, {root!r})
from training.threads import follow_free_cores, watch
threads, steps, dtype = {threads!r}, {steps}, {dtype!r}
os.nice(10)
if threads == "follow":
    follow_free_cores()
else:
    torch.set_num_threads(int(threads))
model = watch(AutoModelForSequenceClassification.from_pretrained({model!r}, num_labels=1, dtype=getattr(torch, dtype)))
model.config.pad_token_id = 0
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
batch = torch.randint(10, 1000, (8, 64))
times, used = [], []
for _ in range(steps + 1):  # the first warms up
    started = time.perf_counter()
    model(input_ids=batch).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - started)
    used.append(torch.get_num_threads())
print(json.dumps({{"seconds": times[1:], "threads": used[1:]}}))
"""


def step_seconds(model: Path, threads: str, steps: int, dtype: str) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    code = STEP.format(root=root, threads=threads, steps=steps, dtype=dtype, model=str(model))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    import torch

    from heed.models import prepare_default_model

    model = prepare_default_model(progress=False)
    settings = {"default": str(torch.get_num_threads()), "1": "1", "follow": "follow"}
    print(f"one reward-model step (8 x 64 tokens, AdamW) of {model.name} at nice 10, {args.dtype}")
    print(f"{'beside':<28}{'threads':<10}{'s/step':>8}  threads used")
    for beside in ("nothing", "a busy loop (one core)"):
        spinner = None
        if beside != "nothing":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            for threads, setting in settings.items():
                result = step_seconds(model, setting, args.steps, args.dtype)
                mean = sum(result["seconds"]) / len(result["seconds"])
                print(f"{beside:<28}{threads:<10}{mean:>8.2f}  {result['threads']}", flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
