"""The reward model's depth, an A/B on a logged run (issue 16): does a reward model on the first N
layers of the policy's body judge as well as one on all of them, and how much faster is it?

    .venv/bin/python bench/rm_depth.py --data simulate-run/data --layers 0,15,10 --out /tmp/rm-depth.json

From the event log of a finished run (`heed simulate`'s data/ folder, or a service's), with the
trainer's own data building (training.round.build_round_data: the same callers held out):
reward models from a new head on ``--model``'s body, trained on the log up to ``--at`` (default:
round 1's watermark, the round whose reward model is the weakest), one per depth and seed, all
judged on the held-out comparisons and thumbs of the whole log (more than the round had). Each
depth's accuracy is given against the whole body's with a 95% interval from a paired bootstrap
over the held-out comparisons (same comparisons, same seed). The trainer's settings are the run's
(results.json's trainer_settings), else HEED_TRAINER_* from the environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
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


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="the run's data folder (events.db, trainer/)")
    p.add_argument("--at", type=int, default=0, help="the training data's log position (0: round 1's watermark)")
    p.add_argument("--layers", default="0,15", help="depths to train, comma-separated (0: the whole body)")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--model", default="", help="the reward models' body (default: the bundled policy)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.evaluate import heldout_metrics
    from training.reward import train_reward_model
    from training.round import reward_examples

    cfg, store, marks, model = warm_start.open_run(args.data, args.model)
    at = args.at or (marks[0] if marks else store.last_seq() // 2)
    data, whole_log = warm_start.round_data(store, cfg, at), warm_start.round_data(store, cfg, store.last_seq())
    judged = [c for c in whole_log.heldout.ranked() if c.kind != "correction"]
    judged_all = reward_examples(whole_log.heldout, 0, cfg.seed)  # every held-out kind: the thumbs' AUC too
    figures: dict = {"at": at, "log_end": store.last_seq(), "heldout_comparisons": len(judged), "runs": []}
    with tempfile.TemporaryDirectory(prefix="rm-depth-") as tmp:
        depths = [int(n) for n in args.layers.split(",")]
        for seed in (int(s) for s in args.seeds.split(",")):
            rows_of: dict[int, list] = {}
            examples = reward_examples(data.train, cfg.rm_max_examples, seed)
            held = reward_examples(data.heldout, cfg.heldout_max_examples, seed)
            for layers in depths:
                out = Path(tmp) / f"rm-{layers}-{seed}"
                rm_cfg = replace(cfg.rm, model=model, layers=layers, out=out, seed=seed, device="cpu")
                start = time.perf_counter()
                result = train_reward_model(rm_cfg, examples, valid=held)
                seconds = time.perf_counter() - start
                rows_of[layers] = warm_start.per_comparison(result.model, judged, cfg.rm.max_length)
                metrics = heldout_metrics(result.model, judged_all, cfg.rm.max_length, cfg.rm.batch_size)
                assert metrics is not None
                row = {
                    "seed": seed, "layers": layers, "examples": len(examples), "seconds": round(seconds, 1),
                    "own_heldout": result.heldout.accuracy if result.heldout else None,
                    "accuracy": warm_start.accuracy(rows_of[layers]),
                    "thumbs_auc": metrics.thumbs_auc, "thumbs": metrics.thumbs,
                }  # fmt: skip
                whole = rows_of[depths[0]]
                if layers != depths[0]:
                    low, high = warm_start.paired_interval(whole, rows_of[layers])
                    row["minus_first"] = row["accuracy"] - warm_start.accuracy(whole)
                    row["interval95"] = [low, high]
                logging.info("%s", row)
                figures["runs"].append(row)
    print(f"\ntrained on the log up to {at} ({figures['runs'][0]['examples']} examples); judged on "
          f"{len(judged)} held-out comparisons of the whole log (up to {figures['log_end']})")  # fmt: skip
    print(
        "| seed | layers (0: all) | held-out accuracy | against the first [95% interval] | thumbs AUC (n) | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for r in figures["runs"]:
        versus = (
            f"{r['minus_first']:+.3f} [{r['interval95'][0]:+.3f}, {r['interval95'][1]:+.3f}]"
            if "interval95" in r
            else ""
        )
        auc = f"{r['thumbs_auc']:.3f} ({r['thumbs']})" if r["thumbs_auc"] is not None else f"- ({r['thumbs']})"
        print(f"| {r['seed']} | {r['layers']} | {r['accuracy']:.3f} | {versus} | {auc} | {r['seconds']} |")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
