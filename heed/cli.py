"""The `heed` command: `heed serve`, `heed model prepare`, `heed train ...`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from heed import config
    from serving.config import ServeConfig

    cfg = config.load(ServeConfig, "serve", args, args.config)
    from heed.models import check_model

    check_model(cfg.model)  # a mistyped --model fails here, before the servers and the engine load
    from serving.app import run

    return run(cfg, args.config)


def _model_prepare(args: argparse.Namespace) -> int:
    from heed.models import prepare_default_model

    prepare_default_model(args.cache_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from heed import config
    from serving.config import ServeConfig

    parser = argparse.ArgumentParser(
        prog="heed",
        description="Serve a language model, log what users say about its answers, and train on it.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the HTTP (OpenAI-compatible) and gRPC completion service",
        description="Run the completion service. Every completion and feedback event is logged "
        "durably to the event log in --data-dir. Settings come from flags, then HEED_SERVE_* "
        "environment variables, then the [serve] table of --config.",
    )
    serve.add_argument("--config", type=Path, default=None, help="a TOML file with a [serve] table")
    config.add_arguments(serve, ServeConfig)
    serve.set_defaults(run=_serve)

    model = commands.add_parser("model", help="manage model folders")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = model_commands.add_parser(
        "prepare",
        help="convert the bundled SmolLM2-135M-Instruct (GGUF) into a Hugging Face folder, once",
    )
    prepare.add_argument("--cache-dir", type=Path, default=None, help="default: $HEED_CACHE_DIR or ~/.cache/heed")
    prepare.set_defaults(run=_model_prepare)

    from heed.operations import register as register_operations
    from heed.simulate import register as register_simulate
    from training.cli import register as register_training
    from training.cli import register_trainer

    register_training(commands)
    register_trainer(commands)
    register_operations(commands)
    register_simulate(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    from heed.models import ModelNotFound
    from heed.registry import RegistryError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        code = 130
    except (ValueError, FileNotFoundError, RegistryError, ModelNotFound) as exc:  # the user's mistakes: one line
        print(f"heed: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
