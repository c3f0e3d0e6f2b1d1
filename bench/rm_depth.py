"""The reward model's depth and sample, an A/B on a logged run (issue 16): does a reward model on
the first N layers of the policy's body judge as well as one on all of them, and how much faster
is it? How many examples of each kind (``--rm-max-examples``) does it need to judge well, and to
keep what a prompt asks for rather than only what most prompts reward (short answers)?

    .venv/bin/python bench/rm_depth.py --data simulate-run/data --layers 0,15,10 --out /tmp/rm-depth.json
    .venv/bin/python bench/rm_depth.py --data simulate-run/data --round 2 --layers 15 --examples 128,256 --seeds 0,1,2

From the event log of a finished run (`heed simulate`'s data/ folder, or a service's), with the
trainer's own data building (training.round.build_round_data: the same callers held out):
reward models from a new head on ``--model``'s body, trained on the log up to ``--at`` (default:
round 1's watermark, the round whose reward model is the weakest; ``--round N``: round N's),
one per depth, sample size and seed, all judged on the held-out comparisons and thumbs of the
whole log (more than the round had). Each one's accuracy is given against the first setting's
(the first depth with the first size) with a 95% interval from a paired bootstrap over the
held-out comparisons (same comparisons, same seed). The trainer's settings are the run's
(results.json's trainer_settings), else HEED_TRAINER_* from the environment.

The required-word probe (`heed simulate`'s instructions, so on its logs): on prompts that ask for
a word (``Use the word "blue"``), how often the reward model scores a short answer with that word
above the same answer with another word in its place (one word; four words). Every other
instruction such a prompt carries (a word limit of 5 or more, one sentence, a forbidden article)
both answers follow, so a labeler prefers the first every time. Most instructions reward short
answers; this one is where a reward model that learned only "short is good" fails, and PPO
against it drops the word.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # bench/training.py is not `training`
_spec = importlib.util.spec_from_file_location("rm_warm_start", _HERE / "rm_warm_start.py")
assert _spec and _spec.loader
warm_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(warm_start)


def word_probe(folder: Path, max_length: int, prompts: int = 60, seed: int = 7) -> dict[str, float]:
    """The share of include_word prompts on which the reward model in ``folder`` scores the answer
    with the required word above the same answer without it: one word ("Blue.") and four."""
    import torch

    from heed.simulate.instructions import FILLER, make_tasks
    from training.data import pad
    from training.evaluate import _tokenizer
    from training.reward import encode_answers, load_reward_model

    tokenizer, pad_id = _tokenizer(folder)
    model = load_reward_model(folder)
    tasks = [t for t in make_tasks(20 * prompts, seed) if t.required_words()]
    rng, wins = random.Random(seed), {"one_word": 0, "four_words": 0}
    for task in tasks[:prompts]:
        word = task.required_words()[0]
        other, rest = rng.choice(FILLER), rng.sample(FILLER, 3)
        answers = (
            f"{word.capitalize()}.", f"{other.capitalize()}.",
            " ".join([word, *rest]).capitalize() + ".", " ".join([other, *rest]).capitalize() + ".",
        )  # fmt: skip
        ids, mask = pad(encode_answers(tokenizer, task.prompt, answers, max_length), pad_id)
        with torch.no_grad():
            s = model.score(ids, mask).tolist()
        wins["one_word"] += s[0] > s[1]
        wins["four_words"] += s[2] > s[3]
    n = min(prompts, len(tasks))
    return {k: v / n for k, v in wins.items()}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="the run's data folder (events.db, trainer/)")
    p.add_argument("--at", type=int, default=0, help="the training data's log position (0: see --round)")
    p.add_argument("--round", type=int, default=1, help="without --at: the log up to this round's watermark")
    p.add_argument("--layers", default="0,15", help="depths to train, comma-separated (0: the whole body)")
    p.add_argument(
        "--examples", default="", help="sample sizes of each kind, comma-separated (0: all; default: the run's)"
    )
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--model", default="", help="the reward models' body (default: the bundled policy)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.evaluate import heldout_metrics
    from training.reward import train_reward_model
    from training.round import reward_examples

    cfg, store, marks, model = warm_start.open_run(args.data, args.model)
    at = args.at or (marks[args.round - 1] if len(marks) >= args.round else store.last_seq() // 2)
    data, whole_log = warm_start.round_data(store, cfg, at), warm_start.round_data(store, cfg, store.last_seq())
    judged = [c for c in whole_log.heldout.ranked() if c.kind != "correction"]
    judged_all = reward_examples(whole_log.heldout, 0, cfg.seed)  # every held-out kind: the thumbs' AUC too
    depths = [int(n) for n in args.layers.split(",")]
    sizes = [int(n) for n in args.examples.split(",")] if args.examples else [cfg.rm_max_examples]
    figures: dict = {"at": at, "log_end": store.last_seq(), "heldout_comparisons": len(judged), "runs": []}
    with tempfile.TemporaryDirectory(prefix="rm-depth-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            first: list | None = None
            held = reward_examples(data.heldout, cfg.heldout_max_examples, seed)
            for layers, size in ((n, k) for n in depths for k in sizes):
                examples = reward_examples(data.train, size, seed)
                out = Path(tmp) / f"rm-{layers}-{size}-{seed}"
                rm_cfg = replace(cfg.rm, model=model, layers=layers, out=out, seed=seed, device="cpu", progress=False)
                start = time.perf_counter()
                result = train_reward_model(rm_cfg, examples, valid=held)
                seconds = time.perf_counter() - start
                rows = warm_start.per_comparison(result.model, judged, cfg.rm.max_length)
                metrics = heldout_metrics(result.model, judged_all, cfg.rm.max_length, cfg.rm.batch_size)
                assert metrics is not None
                row = {
                    "seed": seed, "layers": layers, "examples_each": size, "examples": len(examples),
                    "seconds": round(seconds, 1), "own_heldout": result.heldout.accuracy if result.heldout else None,
                    "accuracy": warm_start.accuracy(rows), "thumbs_auc": metrics.thumbs_auc, "thumbs": metrics.thumbs,
                    **word_probe(result.model, cfg.rm.max_length),
                }  # fmt: skip
                if first is None:
                    first = rows
                else:
                    low, high = warm_start.paired_interval(first, rows)
                    row["minus_first"] = row["accuracy"] - warm_start.accuracy(first)
                    row["interval95"] = [low, high]
                logging.info("%s", row)
                figures["runs"].append(row)
    print(f"\ntrained on the log up to {at}; judged on {len(judged)} held-out comparisons of the whole log "
          f"(up to {figures['log_end']})")  # fmt: skip
    print(
        "| seed | layers (0: all) | of each kind (0: all) | examples | held-out accuracy | against the first "
        "[95% interval] | thumbs AUC (n) | required word: one / four words | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in figures["runs"]:
        versus = (
            f"{r['minus_first']:+.3f} [{r['interval95'][0]:+.3f}, {r['interval95'][1]:+.3f}]"
            if "interval95" in r
            else ""
        )
        auc = f"{r['thumbs_auc']:.3f} ({r['thumbs']})" if r["thumbs_auc"] is not None else f"- ({r['thumbs']})"
        print(
            f"| {r['seed']} | {r['layers']} | {r['examples_each']} | {r['examples']} | {r['accuracy']:.3f} | {versus} "
            f"| {auc} | {r['one_word']:.2f} / {r['four_words']:.2f} | {r['seconds']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
