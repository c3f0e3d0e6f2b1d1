"""``heed train sft|rm|ppo|data|plot`` and ``heed trainer [status]``: flags generated from each
stage's (and the trainer's) config dataclass (training/config.py). The stage commands read the
JSONL files their flags name and hand the records to the stage; the stages never see a path of
input data.

Settings come from flags, then ``HEED_<STAGE>_<FIELD>`` environment variables, then the
``[sft]`` / ``[rm]`` / ``[ppo]`` / ``[trainer]`` table of ``--config``. Multi-process: ``torchrun
--nproc-per-node N -m heed train ...`` (gloo on the CPU). ``python -m training.cli ...`` runs
these commands without the rest of ``heed``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from training.config import (
    KTOFiles,
    PPOFiles,
    RMFiles,
    SFTFiles,
    TrainerConfig,
    add_trainer_arguments,
    load_trainer_config,
)

T = TypeVar("T")

if TYPE_CHECKING:
    from training.kto import KTOResult
    from training.ppo import PPOResult
    from training.reward import RMResult
    from training.sft import SFTResult


# ---- heed train sft|rm|ppo: the files in, the stage, its folder out ------------------------------


def _usable(records: Sequence[T], path: Path, what: str) -> list[T]:
    """The records read from ``path``; none at all is the file's error, named as such."""
    if not records:
        raise ValueError(f"{path}: no usable {what}")
    return list(records)


def _train_and_valid(cfg: Any, read: Callable[[Path, bool], list[T]], what: str) -> tuple[list[T], list[T] | None]:
    """The records of ``--train`` (required, and not empty) and of ``--valid`` (when given)."""
    if cfg.train is None:
        raise ValueError(f"--train (a JSONL file of {what}) is required")
    valid = read(cfg.valid, cfg.strict) if cfg.valid else None
    return _usable(read(cfg.train, cfg.strict), cfg.train, what), valid


def run_sft(cfg: SFTFiles) -> SFTResult:
    """``heed train sft``: the demonstrations of ``--train`` (and ``--valid``) through ``train_sft``."""
    from training.data import read_demonstrations
    from training.sft import train_sft

    return train_sft(cfg, *_train_and_valid(cfg, read_demonstrations, "demonstrations"))


def run_rm(cfg: RMFiles) -> RMResult:
    """``heed train rm``: the comparisons of ``--train``, the thumbs of ``--judged`` and the
    ratings of ``--ratings`` (at least one of them; ``--valid``, ``--reference``) through
    ``train_reward_model``."""
    from training.data import read_comparisons, read_demonstrations, read_judged, read_ratings
    from training.reward import Example, train_reward_model

    if cfg.train is None and cfg.judged is None and cfg.ratings is None:
        raise ValueError("--train (comparisons), --judged (thumbs) or --ratings (JSONL files) is required")
    train: list[Example] = []
    if cfg.train is not None:
        train.extend(_usable(read_comparisons(cfg.train, cfg.strict), cfg.train, "comparisons"))
    if cfg.judged is not None:
        train.extend(_usable(read_judged(cfg.judged, cfg.strict), cfg.judged, "judged answers"))
    if cfg.ratings is not None:
        train.extend(_usable(read_ratings(cfg.ratings, cfg.strict), cfg.ratings, "rated answers"))
    valid = read_comparisons(cfg.valid, cfg.strict) if cfg.valid else None
    reference = read_demonstrations(cfg.reference, cfg.strict) if cfg.reference else None
    return train_reward_model(cfg, train, valid, reference)


def run_kto(cfg: KTOFiles) -> KTOResult:
    """``heed train kto``: the judged answers of ``--train`` (``--valid``) through ``train_kto``."""
    from training.data import read_judged
    from training.kto import train_kto

    return train_kto(cfg, *_train_and_valid(cfg, read_judged, "judged answers"))


def run_ppo(cfg: PPOFiles) -> PPOResult:
    """``heed train ppo``: the prompts of ``--prompts`` (and the text of ``--ptx-data``, the
    demonstrations of ``--demonstrations``) through ``train_ppo``."""
    from training.data import read_demonstrations, read_prompts, read_texts
    from training.ppo import train_ppo

    if cfg.prompts is None or cfg.reward_model is None:
        raise ValueError("--prompts (JSONL) and --reward-model (folder) are required")
    texts = read_texts(cfg.ptx_data, cfg.strict) if cfg.ptx_data else None
    demos = read_demonstrations(cfg.demonstrations, cfg.strict) if cfg.demonstrations else None
    prompts = _usable(read_prompts(cfg.prompts, cfg.strict), cfg.prompts, "prompts")
    return train_ppo(cfg, prompts, texts, demonstrations=demos)


def _stage(section: str, cls: type, run: Callable[[Any], Any]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from heed import config

        result = run(config.load(cls, section, args, args.config))
        print(f"saved {result.model}", flush=True)
        return 0

    return command


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more; got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1; got {value}")
    return value


def _data(args: argparse.Namespace) -> int:
    from heed.eventlog import open_store
    from training.builders import build_from_event_log, export

    store = open_store(args.events)
    try:
        data = build_from_event_log(
            store, args.watermark, max_per_caller=args.max_per_caller, max_caller_share=args.max_caller_share
        )
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

    train = commands.add_parser("train", help="SFT, reward model, PPO(-ptx), KTO; data from the event log; plots")
    stages = train.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    commands_of: tuple[tuple[str, type, Callable[[Any], Any], str], ...] = (
        ("sft", SFTFiles, run_sft, "supervised fine-tuning on demonstrations"),
        ("rm", RMFiles, run_rm, "reward model on K-way comparisons"),
        ("ppo", PPOFiles, run_ppo, "PPO (and PPO-ptx) against a reward model"),
        ("kto", KTOFiles, run_kto, "KTO from unpaired thumbs (a baseline beside RM + PPO)"),
    )
    for name, cls, run, help_text in commands_of:
        stage = stages.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", type=Path, default=None, help=f"a TOML file with a [{name}] table")
        config.add_arguments(stage, cls)
        stage.set_defaults(run=_stage(name, cls, run))

    data = stages.add_parser("data", help="build comparisons, demonstrations and prompts from the event log")
    data.add_argument(
        "--events", required=True, help="the event log (a SQLite path, sqlite:///PATH or postgresql://...)"
    )
    data.add_argument("--out", type=Path, required=True, help="folder for the JSONL files")
    data.add_argument("--watermark", type=int, default=0, help="read events after this log position")
    trainer = TrainerConfig()  # the trainer's own caps, so offline training sees what a round would
    data.add_argument(
        "--max-per-caller",
        type=_count,
        default=trainer.max_per_caller,
        help="each caller's latest N records of each kind, prompts and answers included (0: no cap; default:"
        " the trainer's, %(default)s)",
    )
    data.add_argument(
        "--max-caller-share",
        type=_share,
        default=trainer.max_caller_share,
        help="no caller gives more than this share of any kind (1: no share cap; default: the trainer's, %(default)s)",
    )
    data.set_defaults(run=_data)

    plot = stages.add_parser("plot", help="draw a run's metrics to a PNG")
    plot.add_argument("run_dir", type=Path, help="a run folder with metrics.jsonl")
    plot.add_argument("--out", type=Path, default=None, help="the PNG (default: RUN_DIR/metrics.png)")
    plot.set_defaults(run=_plot)


# ---- heed trainer --------------------------------------------------------------------------------


def _trainer(args: argparse.Namespace) -> int:
    from training.trainer import run_trainer

    return run_trainer(load_trainer_config(args, args.config))


def _heldout_summary(heldout: dict[str, Any]) -> str:
    """A round report's held-out reward-model metrics, per kind that had data."""

    def fmt(value: float | None) -> str:
        return "none" if value is None else f"{value:.3f}"

    parts = []
    if heldout.get("comparisons"):
        parts.append(f"accuracy {fmt(heldout['accuracy'])} on {heldout['comparisons']} comparisons")
    if heldout.get("thumbs"):
        auc, ece = fmt(heldout["thumbs_auc"]), fmt(heldout["thumbs_ece"])
        parts.append(f"thumbs AUC {auc}, ECE {ece} on {heldout['thumbs']}")
    if heldout.get("ratings"):
        parts.append(f"ratings Spearman {fmt(heldout['ratings_spearman'])} on {heldout['ratings']}")
    if heldout.get("corrections"):
        parts.append(f"corrections {fmt(heldout['correction_accuracy'])} on {heldout['corrections']}")
    return "; ".join(parts) or "no held-out data"


def _published(versions: Sequence[str], cfg: TrainerConfig, shown: int = 10) -> str:
    """The versions the trainer published: the latest ``shown``, with how many of all were pruned."""
    from heed.datadir import registry_location
    from heed.registry import PolicyRegistry

    if not versions:
        return "(none)"
    registry = registry_location(cfg.registry, cfg.data_dir)
    pruned = {m.version for m in PolicyRegistry(registry).pruned()} if registry.exists() else set()
    latest = ", ".join(f"{v} (pruned)" if v in pruned else v for v in versions[-shown:])
    if len(versions) <= shown:
        return latest
    gone = sum(v in pruned for v in versions)
    return f"{len(versions)}, {gone} of them pruned; the latest {shown}: {latest}"


def _trainer_status(args: argparse.Namespace) -> int:
    from heed.eventlog import log_location
    from heed.rollout import read_state
    from heed.trainer_files import TrainerFiles, TrainerState

    cfg = load_trainer_config(args, args.config)
    files = TrainerFiles.of(cfg.data_dir)
    state = TrainerState.load(files.state)
    stable = read_state(log_location(cfg.event_log, cfg.data_dir), cfg.data_dir).stable
    print(f"trainer on {cfg.data_dir}")
    print(f"  stable version:     {stable or '(none yet)'}")
    print(f"  rounds completed:   {state.round}")
    print(f"  watermark:          {state.watermark} (feedback then: {state.feedback:g})")
    if state.pending_watermark is not None:
        print(f"  round in progress:  {state.round + 1}, reading up to log position {state.pending_watermark}")
    rm = files.root / state.reward_model if state.reward_model else "(none yet: the next round starts a new one)"
    print(f"  reward model:       {rm}")
    print(f"  published versions: {_published(state.versions, cfg)}")
    reports = files.reports(last=args.last)
    for report in reports:
        print(f"\nround {report['round']}: {report['decision']}")
        print(f"  log positions {report.get('previous_watermark', '?')}..{report.get('watermark', '?')}")
        data = report.get("data", {})
        print("  data: " + ", ".join(f"{k} {v}" for k, v in data.items()))
        heldout = report.get("stages", {}).get("reward_model", {}).get("heldout")
        if heldout:
            print("  reward model held-out: " + _heldout_summary(heldout))
        for check in report.get("gate", []):
            value = "none" if check["value"] is None else f"{check['value']:.4g}"
            if check.get("bound") is not None:  # what the rule judged (reports before it have none)
                value += f" (upper bound {check['bound']:.4g})"
            verdict = "passed" if check["passed"] else "FAILED"
            print(f"  gate: {check['name']} {value} {check['rule']} {check['threshold']:.4g}: {verdict}")
        stages = report.get("stages", {})
        if stages:
            print("  stages: " + ", ".join(f"{name} {s['seconds']:.0f} s" for name, s in stages.items()))
    if not reports and state.round == 0:
        print("\nno rounds yet")
    return 0


def register_trainer(commands: Any) -> None:
    """Add ``heed trainer`` (the co-located training service) and ``heed trainer status``."""
    description = (
        "Follow the event log of --data-dir and turn new feedback into a new policy version: reward model, "
        "PPO-ptx from the stable version, evaluation, and a gate before publishing to the registry. "
        "Settings come from flags, then HEED_TRAINER_* environment variables, then the [trainer] table of --config."
    )
    trainer = commands.add_parser("trainer", help="run the co-located trainer service", description=description)
    trainer.add_argument("--config", type=Path, default=None, help="a TOML file with a [trainer] table")
    add_trainer_arguments(trainer)
    trainer.set_defaults(run=_trainer)
    actions = trainer.add_subparsers(dest="trainer_command", metavar="ACTION")
    status = actions.add_parser("status", help="print the trainer's state and its last rounds' reports")
    status.add_argument(
        "--data-dir", type=Path, default=argparse.SUPPRESS, help="the data directory (default: as `heed trainer`)"
    )
    status.add_argument("--last", type=int, default=3, help="how many of the last rounds to show (default: 3)")
    status.set_defaults(run=_trainer_status)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cli train ...|trainer ...``: the training commands on their own."""
    parser = argparse.ArgumentParser(prog="heed", description="The training half of heed.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(commands)
    register_trainer(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.run(args))


if __name__ == "__main__":  # vLLM spawns workers that re-import __main__: keep the guard
    sys.exit(main())
