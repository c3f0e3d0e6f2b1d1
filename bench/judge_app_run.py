"""A `heed simulate` run's judging, redone offline (docs/results.md, the app run): the start and
final policies' answers to the run's 200 evaluation prompts (default settings) sampled with
transformers.generate (temperature 0.7, 48 tokens), judged by the run's held-out and training
labelers with the experiment's own functions.

    .venv/bin/python bench/judge_app_run.py RUN_FOLDER START_VERSION FINAL_VERSION
"""

import json
import sys
from pathlib import Path

from heed.registry import PolicyRegistry
from heed.simulate.experiment import SimulateConfig, following, win_rate
from heed.simulate.instructions import make_tasks
from heed.simulate.kto import sample
from heed.simulate.labelers import population

cfg = SimulateConfig()
kinds = cfg.kind_list()
tasks = make_tasks(cfg.eval_prompts, cfg.seed + 7, kinds)
people = population(cfg.train_labelers, cfg.heldout_labelers, cfg.seed, kinds)
heldout = [p for p in people if p.group == "heldout"]
trainers = [p for p in people if p.group == "train"]
run, start_version, final_version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
reg = PolicyRegistry(run / "data" / "registry")
start = sample(reg.path(start_version), tasks, max_new_tokens=48, temperature=0.7, seed=0)
final = sample(reg.path(final_version), tasks, max_new_tokens=48, temperature=0.7, seed=0)
out = {
    "heldout": win_rate(tasks, start, final, heldout, cfg.seed + 11),
    "training_group": win_rate(tasks, start, final, trainers, cfg.seed + 12),
    "following": {"start": following(tasks, start), "final": following(tasks, final)},
    "examples": [
        {"prompt": t.prompt, "start": s, "final": f} for t, s, f in list(zip(tasks, start, final, strict=True))[:4]
    ],
}
(run / "judged-offline.json").write_text(json.dumps(out, indent=2))
print(json.dumps({k: out[k] for k in ("heldout", "training_group", "following")}, indent=1))
