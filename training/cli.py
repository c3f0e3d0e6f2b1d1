"""``heed train sft|rm|ppo|data|plot``: flags generated from each stage's config dataclass.

Settings come from flags, then ``HEED_<STAGE>_<FIELD>`` environment variables, then the
``[sft]`` / ``[rm]`` / ``[ppo]`` table of ``--config``. Multi-process: ``torchrun
--nproc-per-node N -m heed train ...`` (gloo on the CPU)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _stage(section: str, module_path: str, names: tuple[str, str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        from heed import config

        module = importlib.import_module(module_path)
        config_class, train = names  # e.g. ("SFTConfig", "train_sft")
        cfg = config.load(getattr(module, config_class), section, args, args.config)
        dest = getattr(module, train)(cfg)
        print(f"saved {dest}", flush=True)
        return 0

    return run


def _data(args: argparse.Namespace) -> int:
    from heed.eventlog import open_store
    from training.builders import build_from_event_log, export

    store = open_store(args.events)
    try:
        data = build_from_event_log(store, args.watermark)
    finally:
        store.close()
    counts = export(data, args.out)
    print(f"wrote {counts} to {args.out} (watermark {data.watermark})", flush=True)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from training.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}", flush=True)
    return 0


def register(commands: Any) -> None:
    """Add ``heed train ...`` to the ``heed`` command's subparsers."""
    from heed import config
    from training.ppo import PPOConfig
    from training.reward import RMConfig
    from training.sft import SFTConfig

    train = commands.add_parser("train", help="SFT, reward model, PPO(-ptx); data from the event log; plots")
    stages = train.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    for name, cls, module, fn, help_text in (
        ("sft", SFTConfig, "training.sft", "train_sft", "supervised fine-tuning on demonstrations"),
        ("rm", RMConfig, "training.reward", "train_reward_model", "reward model on K-way comparisons"),
        ("ppo", PPOConfig, "training.ppo", "train_ppo", "PPO (and PPO-ptx) against a reward model"),
    ):
        stage = stages.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", type=Path, default=None, help=f"a TOML file with a [{name}] table")
        config.add_arguments(stage, cls)
        stage.set_defaults(run=_stage(name, module, (cls.__name__, fn)))

    data = stages.add_parser("data", help="build comparisons, demonstrations and prompts from the event log")
    data.add_argument("--events", required=True, help="the event log (a SQLite path or sqlite:///PATH)")
    data.add_argument("--out", type=Path, required=True, help="folder for the JSONL files")
    data.add_argument("--watermark", type=int, default=0, help="read events after this log position")
    data.set_defaults(run=_data)

    plot = stages.add_parser("plot", help="draw a run's metrics to a PNG")
    plot.add_argument("run_dir", type=Path, help="a run folder with metrics.jsonl")
    plot.add_argument("--out", type=Path, default=None, help="the PNG (default: RUN_DIR/metrics.png)")
    plot.set_defaults(run=_plot)
