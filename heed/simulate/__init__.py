"""`heed simulate`: simulated users and labelers with hidden, checkable preferences drive the real
service and its trainer, and held-out labelers judge the result (docs/results.md)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _simulate(args: argparse.Namespace) -> int:
    from heed import config
    from heed.launcher import exit_on_sigterm
    from heed.registry import PolicyRegistry
    from heed.simulate import experiment, report
    from heed.simulate.instructions import make_tasks
    from heed.trainer_files import TrainerFiles, TrainerState

    cfg = config.load(experiment.SimulateConfig, "simulate", args, args.config)
    exit_on_sigterm()  # SIGTERM unwinds like Ctrl-C, so the server this started is stopped too
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    results = experiment.run(cfg)
    if cfg.tax_text is not None and cfg.tax_iterations > 0:
        from heed.simulate.tax import alignment_tax
        from training.data import read_texts

        data = cfg.data()
        state = TrainerState.load(TrainerFiles.of(data.root).state)
        if state.reward_model is None:
            log.warning("no reward model was kept by the trainer: no alignment-tax measurement")
        else:
            ppo = experiment.trainer_config(results["trainer_settings"]).ppo  # the PPO settings it used
            results["tax"] = alignment_tax(
                PolicyRegistry(data.registry).path(results["start_version"]),
                data.trainer / state.reward_model,
                [t.prompt for t in make_tasks(64, cfg.seed + 23, cfg.kind_list())],
                read_texts(cfg.tax_text),
                cfg.out / "tax",
                ptx_coef=ppo.ptx_coef,
                iterations=cfg.tax_iterations,
                episodes=ppo.episodes,
                max_new_tokens=cfg.max_tokens,
                lr=ppo.lr,
                value_lr=ppo.value_lr,
                minibatch_size=ppo.minibatch_size,
                kl_coef=ppo.kl_coef,
                seed=cfg.seed,
            )
            (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    report.write(results, cfg.out)
    print(report.markdown(results))
    print(f"results: {cfg.out / 'results.json'}, {cfg.out / 'results.md'}, {cfg.out / 'results.png'}")
    return 0


def register(commands: Any) -> None:
    from heed import config
    from heed.simulate.experiment import SimulateConfig

    parser = commands.add_parser(
        "simulate",
        help="run the alignment experiment: simulated labelers, the real service and trainer, held-out judges",
        description="Start `heed serve --with-trainer`, let simulated training-group labelers use it "
        "(prompts with checkable instructions; thumbs and K-way rankings by hidden preferences) while "
        "the trainer runs rounds and the canary rolls out, then have held-out labelers judge the final "
        "policy against the start. Writes results.json, results.md and results.png to --out. The "
        "trainer's settings come from HEED_TRAINER_* (defaults: heed.simulate.experiment.TRAINER_DEFAULTS).",
    )
    parser.add_argument("--config", type=Path, default=None, help="a TOML file with a [simulate] table")
    config.add_arguments(parser, SimulateConfig)
    parser.set_defaults(run=_simulate)
