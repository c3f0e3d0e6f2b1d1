"""Training benchmark on the bundled SmolLM2-135M-Instruct (not a timed test).

1. Reward-model training on hh-rlhf-harmless comparisons: examples/s, answers/s, tokens/s,
   held-out pairwise accuracy. With ``--rm-data thumbs`` the same answers unpaired (each chosen
   answer a thumb up, each rejected one a thumb down: the pointwise loss): held-out thumbs AUC.
2. PPO iterations against that reward model, rollouts through vLLM and through
   transformers.generate in the same run: episodes/s, tokens/s and the time split between
   generation, scoring and update (the first iteration of each is reported apart: warm-up).

    .venv/bin/python bench/training.py --out bench-results/training.json
    .venv/bin/python bench/training.py --rm-train 32 --engines hf --ppo-lora 0,8   # PPO: full against LoRA r 8

The data folder is only needed here; heed itself never reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `training` package: drop the folder.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

DEFAULT_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "comparisons.jsonl.gz"


def bench_reward_model(model: Path, hh: Path, work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    from transformers import AutoTokenizer

    from training.config import RMConfig
    from training.data import Judged, read_comparisons
    from training.reward import Example, encode_answers, train_reward_model

    comparisons = read_comparisons(hh)
    random.Random(0).shuffle(comparisons)
    train_c, valid_c = comparisons[: args.rm_train], comparisons[args.rm_train : args.rm_train + args.rm_valid]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokens = sum(len(s) for c in train_c for s in encode_answers(tokenizer, c.prompt, c.responses, args.max_length))
    answers = sum(len(c.responses) for c in train_c)

    def unpaired(items: list) -> list[Example]:
        return [Judged(c.prompt, c.responses[i], i == 0) for c in items for i in (0, 1)]

    train: list[Example] = unpaired(train_c) if args.rm_data == "thumbs" else list(train_c)
    valid: list[Example] = unpaired(valid_c) if args.rm_data == "thumbs" else list(valid_c)
    cfg = RMConfig(
        model=str(model),
        out=work / "rm",
        epochs=1,
        batch_size=args.rm_batch_size,
        lr=args.rm_lr,
        max_length=args.max_length,
        eval_every=10**9,
    )
    t0 = time.perf_counter()
    result = train_reward_model(cfg, train, valid)
    seconds = time.perf_counter() - t0
    rows = result.steps
    # Steady-state training speed: from the end of step 1 to the end of the step before the last
    # (the last row also holds the held-out evaluation).
    steps = len(rows) - 2
    step_seconds = (rows[-2].time - rows[0].time) / max(steps, 1)
    per_step = args.rm_batch_size
    heldout = result.heldout

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return result.model, {
        "data": args.rm_data,
        "train_examples": len(train),
        "valid_examples": len(valid),
        "seconds_total": round(seconds, 1),
        "seconds_per_step": round(step_seconds, 2),
        "examples_per_s": round(per_step / step_seconds, 3),
        "answers_per_s": round(answers / len(train) * per_step / step_seconds, 3),
        "train_tokens_per_s": round(tokens / len(train) * per_step / step_seconds, 1),
        "valid_accuracy": rounded(heldout.accuracy) if heldout else None,
        "valid_thumbs_auc": rounded(heldout.thumbs_auc) if heldout else None,
    }


def bench_ppo(model: Path, rm: Path, work: Path, engine: str, args: argparse.Namespace, lora_r: int = 0) -> dict:
    from training.config import PPOConfig, SamplingEngine
    from training.data import read_prompts, read_texts
    from training.ppo import train_ppo

    cfg = PPOConfig(
        policy=str(model),
        reward_model=rm,
        out=work / f"ppo-{engine}-r{lora_r}",
        iterations=args.ppo_iterations,
        episodes=args.episodes,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_length,
        minibatch_size=args.minibatch_size,
        ppo_epochs=1,
        rollout=SamplingEngine(engine),
        ptx_coef=1.0,
        ptx_batch_size=2,
        ptx_max_length=128,
        lr=1e-5 if lora_r else 1e-6,
        lora_r=lora_r,
    )
    t0 = time.perf_counter()
    run = train_ppo(cfg, read_prompts(work / "prompts.jsonl"), read_texts(work / "text.jsonl"))
    seconds = time.perf_counter() - t0
    rows = run.iterations
    steady = rows[1:] or rows

    def avg(key: str) -> float:
        return round(statistics.mean(getattr(r, key) for r in steady), 3)

    return {
        "engine": engine,
        "lora_r": lora_r,
        "iterations": len(rows),
        "seconds_total_with_start_up": round(seconds, 1),
        "episodes_per_s": avg("episodes_per_s"),
        "tokens_per_s": avg("tokens_per_s"),
        "time_generate_s": avg("time_generate"),
        "time_score_s": avg("time_score"),
        "time_update_s": avg("time_update"),
        "response_length": avg("response_length"),
        "first_iteration": {k: round(getattr(rows[0], k), 3) for k in ("time_generate", "time_score", "time_update")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hh", type=Path, default=DEFAULT_HH, help="hh-rlhf comparisons (.jsonl.gz)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--rm-train", type=int, default=96)
    parser.add_argument("--rm-valid", type=int, default=64)
    parser.add_argument("--rm-batch-size", type=int, default=2)
    parser.add_argument("--rm-lr", type=float, default=1e-5)
    parser.add_argument(
        "--rm-data", choices=("comparisons", "thumbs"), default="comparisons", help="the reward model's examples"
    )
    parser.add_argument("--rm-only", action="store_true", help="the reward model only, no PPO")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--ppo-iterations", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--minibatch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--engines", default="vllm,hf", help="rollout engines to compare")
    parser.add_argument(
        "--ppo-lora", default="0", help="policy LoRA ranks to compare, e.g. 0,8 (0: full fine-tuning, the default)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from heed.models import prepare_default_model
    from training.data import read_comparisons, write_jsonl

    model = prepare_default_model()
    results: dict = {"model": str(model), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="heed-bench-") as tmp:
        work = Path(tmp)
        rm, results["reward_model"] = bench_reward_model(model, args.hh, work, args)
        print(json.dumps(results["reward_model"], indent=2), flush=True)
        if args.rm_only:
            args.engines = ""
        held_out = read_comparisons(args.hh)[-200:]
        write_jsonl(work / "prompts.jsonl", [c.prompt for c in held_out])
        texts = [f"{c.prompt} {c.responses[0]}" for c in held_out[:50] if isinstance(c.prompt, str)]  # hh: text prompts
        write_jsonl(work / "text.jsonl", [{"text": t} for t in texts])
        results["ppo"] = []
        for engine in filter(None, args.engines.split(",")):
            for rank in (int(r) for r in args.ppo_lora.split(",")):
                results["ppo"].append(bench_ppo(model, rm, work, engine, args, rank))
                print(json.dumps(results["ppo"][-1], indent=2), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
