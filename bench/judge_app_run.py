"""A `heed simulate` run's judging, redone offline (docs/results.md, the app runs): the start and
final policies' answers to the run's 200 evaluation prompts (default settings) sampled with
transformers.generate (temperature 0.7, 48 tokens), judged by the run's held-out and training
labelers with the experiment's own functions. With --kto, also KTO from the start policy on the
same feedback the final version was trained on (heed.simulate.kto.compare_kto), judged against
the start and head to head against the final (PPO-ptx) version.

    .venv/bin/python -P bench/judge_app_run.py RUN_FOLDER START_VERSION FINAL_VERSION [--kto]

(-P: bench/training.py must not shadow the training package.)
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from heed.registry import PolicyRegistry
from heed.simulate.experiment import SimulateConfig, following, trainer_config, win_rate
from heed.simulate.instructions import make_tasks
from heed.simulate.kto import compare_kto, sample
from heed.simulate.labelers import population

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run", type=Path)
parser.add_argument("start_version")
parser.add_argument("final_version")
parser.add_argument("--kto", action="store_true", help="also train and judge KTO on the same feedback")
args = parser.parse_args()

cfg = SimulateConfig()
kinds = cfg.kind_list()
tasks = make_tasks(cfg.eval_prompts, cfg.seed + 7, kinds)
people = population(cfg.train_labelers, cfg.heldout_labelers, cfg.seed, kinds)
heldout = [p for p in people if p.group == "heldout"]
trainers = [p for p in people if p.group == "train"]
reg = PolicyRegistry(args.run / "data" / "registry")


def whole_model(version: str) -> Path:
    """The version's full-weight folder: an adapter version (adapter mode) merged into its base."""
    manifest = reg.manifest(version)
    if manifest.mode == "full":
        return reg.verify(version)
    from training.runtime import merge_adapter

    dest = args.run / "merged" / version
    if not (dest / "config.json").is_file():
        merge_adapter(reg.verify_full(manifest.base or ""), reg.verify(version), dest)
    return dest


start = sample(whole_model(args.start_version), tasks, max_new_tokens=48, temperature=0.7, seed=0)
final = sample(whole_model(args.final_version), tasks, max_new_tokens=48, temperature=0.7, seed=0)
out: dict[str, Any] = {
    "heldout": win_rate(tasks, start, final, heldout, cfg.seed + 11),
    "training_group": win_rate(tasks, start, final, trainers, cfg.seed + 12),
    "following": {"start": following(tasks, start), "final": following(tasks, final)},
    "examples": [
        {"prompt": t.prompt, "start": s, "final": f} for t, s, f in list(zip(tasks, start, final, strict=True))[:4]
    ],
}
print(json.dumps({k: out[k] for k in ("heldout", "training_group", "following")}, indent=1), flush=True)
if args.kto:
    settings = json.loads((args.run / "results.json").read_text()).get("trainer_settings", {})
    trainer = trainer_config(settings)
    started = time.time()
    out["kto"] = compare_kto(
        {"start_version": args.start_version, "final_version": args.final_version},
        args.run / "data",
        args.run / "kto",
        tasks,
        {"start": start, "final": final},
        heldout,
        heldout_fraction=trainer.heldout_fraction,
        max_per_caller=trainer.max_per_caller,
        lr=cfg.kto_lr,
        epochs=cfg.kto_epochs,
        beta=cfg.kto_beta,
        max_new_tokens=48,
        temperature=0.7,
        seed=cfg.seed,
    )
    out["kto"]["seconds"] = round(time.time() - started, 1)
    print(json.dumps({k: v for k, v in out["kto"].items() if k != "last_step"}, indent=1), flush=True)
(args.run / "judged-offline.json").write_text(json.dumps(out, indent=2))
