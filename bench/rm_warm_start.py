"""Reward-model warm start, an A/B on a logged run (issue 16, "no wasted rounds"): does the next
round's reward model gain from starting at the last round's, also when that one missed the
gate's floor?

    .venv/bin/python bench/rm_warm_start.py --data simulate-run/data --out /tmp/rm-warm.json

From the event log of a finished run (`heed simulate`'s data/ folder, or a service's), with the
trainer's own data building (training.round.build_round_data: the same callers held out):

1. round A: the log up to an early position (``--early``; default half of round 1's watermark,
   so its reward model is a weak one) -> a reward model from a new head;
2. round B: the log up to a later position (``--late``; default round 2's watermark, else the
   log's end), trained from a new head and warm-started from round A's, once per ``--seeds``;
3. all of them judged on round B's held-out comparisons. The difference warm - new is given with
   a 95% interval from a paired bootstrap over the held-out comparisons (same comparisons, same
   seed); a positive lower bound says warm-starting helps.

The trainer's settings are the run's (results.json's trainer_settings, as `heed simulate` wrote
them), else HEED_TRAINER_* from the environment. Reward models start on ``--model`` (default:
the bundled policy), not on a round's stable policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def open_run(data: Path, model: str = "") -> tuple[Any, Any, list[int], str]:
    """A logged run's trainer settings (results.json's trainer_settings, else HEED_TRAINER_* from
    the environment), its event log, its rounds' watermarks, and the reward models' body (``model``,
    default: the bundled policy)."""
    from heed.eventlog import open_store
    from heed.models import resolve_model
    from heed.trainer_files import TrainerFiles
    from training.config import load_trainer_config

    results = data.parent / "results.json"
    settings = json.loads(results.read_text()).get("trainer_settings", {}) if results.is_file() else {}
    cfg = load_trainer_config(env={**os.environ, **settings})
    marks = [r["watermark"] for r in TrainerFiles.of(data).reports() if "watermark" in r]
    return cfg, open_store(str(data / "events.db")), marks, str(resolve_model(model or None))


def round_data(store: Any, cfg: Any, at: int) -> Any:
    """The data the trainer builds for a round at log position ``at`` (the same callers held out)."""
    from training.round import build_round_data

    share = cfg.max_caller_share
    return build_round_data(
        store, at, cfg.heldout_fraction, cfg.max_per_caller, score_keys=cfg.score_keys, max_caller_share=share
    )


def per_comparison(folder: Path, examples: list, max_length: int) -> list[tuple[float, int]]:
    """(pairs ordered as people did, pairs) of each held-out comparison, under the reward model in ``folder``."""
    from training import runtime
    from training.evaluate import _tokenizer
    from training.reward import _pairs, encode_example, evaluate, load_reward_model

    tokenizer, pad_id = _tokenizer(folder)
    model = load_reward_model(folder)
    bf16 = runtime.use_bf16(None, runtime.resolve_device("cpu"))
    out = []
    for example in examples:
        h = evaluate(model, [encode_example(tokenizer, example, max_length)], pad_id, 1, bf16)
        pairs = len(_pairs(example.ranks if example.ranks is not None else len(example.responses))[1])
        out.append(((h.accuracy or 0.0) * pairs, pairs))
    return out


def accuracy(rows: list[tuple[float, int]]) -> float:
    return sum(r for r, _ in rows) / max(1, sum(t for _, t in rows))


def paired_interval(a: list[tuple[float, int]], b: list[tuple[float, int]], draws: int = 2000) -> tuple[float, float]:
    """95% interval of accuracy(b) - accuracy(a), resampling the comparisons together."""
    rng = random.Random(0)
    n, diffs = len(a), []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(accuracy([b[i] for i in idx]) - accuracy([a[i] for i in idx]))
    diffs.sort()
    return diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="the run's data folder (events.db, trainer/)")
    p.add_argument("--early", type=int, default=0, help="round A's log position (0: half of round 1's watermark)")
    p.add_argument("--late", type=int, default=0, help="round B's log position (0: round 2's watermark, else the end)")
    p.add_argument("--seeds", default="0,1", help="round B's training seeds")
    p.add_argument("--model", default="", help="the reward models' body (default: the bundled policy)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.evaluate import rm_checks
    from training.reward import train_reward_model
    from training.round import reward_examples

    cfg, store, marks, model = open_run(args.data, args.model)
    early = args.early or (marks[0] // 2 if marks else store.last_seq() // 4)
    late = args.late or (marks[1] if len(marks) > 1 else store.last_seq())
    data_a, data_b = round_data(store, cfg, early), round_data(store, cfg, late)
    heldout_b = [c for c in data_b.heldout.ranked() if c.kind != "correction"]
    figures: dict = {"early": early, "late": late, "heldout_comparisons": len(heldout_b)}
    with tempfile.TemporaryDirectory(prefix="rm-warm-") as tmp:
        work = Path(tmp)

        def train(name: str, data, init: Path | None, seed: int) -> tuple[Path, dict]:
            examples = reward_examples(data.train, cfg.rm_max_examples, seed)
            held = reward_examples(data.heldout, cfg.heldout_max_examples, seed)
            start = time.perf_counter()
            rm_cfg = replace(cfg.rm, model=model, init=init, out=work / name, seed=seed, device="cpu")
            result = train_reward_model(rm_cfg, examples, valid=held)
            rows = per_comparison(result.model, heldout_b, cfg.rm.max_length)
            own = result.heldout.accuracy if result.heldout else None
            passed = all(c.passed for c in rm_checks(result.heldout, None, cfg))
            row = {"examples": len(examples), "own_heldout": own, "passes_gate_alone": passed,
                   "on_b": accuracy(rows), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            logging.info("%s: %s", name, row)
            return result.model, {**row, "rows": rows}

        rm_a, a = train("a", data_a, None, cfg.seed)
        figures["a"] = {k: v for k, v in a.items() if k != "rows"}
        figures["b"] = []
        for seed in (int(s) for s in args.seeds.split(",")):
            _, new = train(f"b-new-{seed}", data_b, None, seed)
            _, warm = train(f"b-warm-{seed}", data_b, rm_a, seed)
            low, high = paired_interval(new["rows"], warm["rows"])
            figures["b"].append({
                "seed": seed, "new": {k: v for k, v in new.items() if k != "rows"},
                "warm": {k: v for k, v in warm.items() if k != "rows"},
                "warm_minus_new": warm["on_b"] - new["on_b"], "interval95": [low, high],
            })  # fmt: skip
    a, b_examples = figures["a"], figures["b"][0]["new"]["examples"]
    print(f"\nlog positions: round A up to {early} ({a['examples']} training examples), round B up to "
          f"{late} ({b_examples}); judged on {len(heldout_b)} held-out comparisons of B")  # fmt: skip
    print(f"round A's reward model: {a['own_heldout']} on its own held-out, passes the gate alone: "
          f"{a['passes_gate_alone']}; {a['on_b']:.3f} on B's")  # fmt: skip
    print("| seed | new head | warm from A | warm - new [95% interval] | seconds new / warm |")
    print("|---|---|---|---|---|")
    for b in figures["b"]:
        low, high = b["interval95"]
        print(f"| {b['seed']} | {b['new']['on_b']:.3f} | {b['warm']['on_b']:.3f} | {b['warm_minus_new']:+.3f} "
              f"[{low:+.3f}, {high:+.3f}] | {b['new']['seconds']} / {b['warm']['seconds']} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
