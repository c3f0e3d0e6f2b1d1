"""The training configs: the trainer holds its stages' configs whole, each of its flat flags
(``--rm-lr``, ``--ppo-iterations``, ``--kl-coef``...) sets the stage field it names, and its
defaults are what they were before the stage configs moved in."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from training.config import (
    TRAINER_FLAGS,
    PPOConfig,
    PPOFiles,
    RMConfig,
    RMFiles,
    SFTConfig,
    SFTFiles,
    StageConfig,
    TrainerConfig,
    TrainerFlags,
    add_trainer_arguments,
    load_trainer_config,
    trainer_config,
    trainer_flags,
)

# A value for each mapped flag that differs from the trainer's default, as typed on a command line.
GIVEN = {
    "rm_lr": "3e-4",
    "rm_epochs": "3",
    "rm_batch_size": "7",
    "rm_max_length": "99",
    "rm_layers": "12",
    "rm_ranking_weight": "0.5",
    "rm_thumb_weight": "2.0",
    "rm_rating_weight": "0.25",
    "rm_correction_weight": "3.0",
    "rm_feedback_lr": "0.05",
    "ppo_iterations": "3",
    "ppo_episodes": "5",
    "ppo_minibatch_size": "5",
    "ppo_lr": "2e-5",
    "value_lr": "4e-5",
    "kl_coef": "0.5",
    "ptx_coef": "0.25",
    "ptx_demo_share": "0.75",
    "max_new_tokens": "17",
    "rollout": "vllm",
    "rollout_gpu_memory_utilization": "0.25",
    "weight_transfer": "disk",
    "temperature": "0.7",
}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_trainer_arguments(parser)
    return parser.parse_args(list(argv))


def typed(stage_class: type, name: str, text: str) -> Any:
    value = {f.name: f for f in dataclasses.fields(stage_class)}[name].default
    return type(value)(text)


def test_every_mapped_flag_is_given_a_test_value() -> None:
    assert set(GIVEN) == set(TRAINER_FLAGS)


@pytest.mark.parametrize(("flag", "target"), sorted(TRAINER_FLAGS.items()))
def test_a_trainer_flag_sets_the_stage_field_it_maps_to(flag: str, target: tuple[str, str]) -> None:
    stage, name = target
    stage_class = RMConfig if stage == "rm" else PPOConfig
    expected = typed(stage_class, name, GIVEN[flag])

    by_flag = load_trainer_config(parse("--" + flag.replace("_", "-"), GIVEN[flag]), env={})
    by_env = load_trainer_config(env={f"HEED_TRAINER_{flag.upper()}": GIVEN[flag]})

    for cfg in (by_flag, by_env):
        assert getattr(getattr(cfg, stage), name) == expected
        others = {f: v for f, v in trainer_flags(cfg).items() if f != flag}
        assert others == {f: v for f, v in trainer_flags(TrainerConfig()).items() if f != flag}


def test_a_toml_trainer_table_takes_the_flat_keys(tmp_path: Path) -> None:
    (tmp_path / "heed.toml").write_text("[trainer]\nppo_iterations = 3\nrm_lr = 0.001\nmin_win_rate = 0.6\n")

    cfg = load_trainer_config(config_file=tmp_path / "heed.toml", env={})

    assert (cfg.ppo.iterations, cfg.rm.lr, cfg.min_win_rate) == (3, 0.001, 0.6)


def test_the_trainer_keeps_its_own_stage_defaults() -> None:
    """The values the trainer's flags defaulted to before its config held the stages' configs."""
    before = {
        "rm_lr": 1e-5,
        "rm_epochs": 1,
        "rm_batch_size": 2,
        "rm_max_length": 256,
        "ppo_iterations": 8,
        "ppo_episodes": 8,
        "ppo_minibatch_size": 4,
        "ppo_lr": 1e-6,
        "value_lr": 1e-5,
        "kl_coef": 0.02,
        "ptx_coef": 1.0,
        "max_new_tokens": 32,
        "rollout": "hf",
        "temperature": 1.0,
    }
    cfg = load_trainer_config(env={})

    assert {flag: trainer_flags(cfg)[flag] for flag in before} == before
    assert (cfg.rm.progress, cfg.ppo.progress) == (False, False)
    assert cfg == TrainerConfig()


def test_the_flat_settings_give_back_the_nested_config() -> None:
    default = TrainerConfig()
    cfg = dataclasses.replace(
        default,
        min_win_rate=0.9,
        ppo=dataclasses.replace(default.ppo, kl_coef=0.3),
        rm=dataclasses.replace(default.rm, lr=2.0),
    )

    assert trainer_config(TrainerFlags(**trainer_flags(cfg))) == cfg


def test_the_stages_share_their_common_fields_and_the_cli_adds_only_files() -> None:
    shared = {f.name for f in dataclasses.fields(StageConfig)}
    for stage, files in ((SFTConfig, SFTFiles), (RMConfig, RMFiles), (PPOConfig, PPOFiles)):
        assert issubclass(stage, StageConfig) and issubclass(files, stage)
        own = {f.name for f in dataclasses.fields(stage)}
        assert shared <= own
        added = {f.name for f in dataclasses.fields(files)} - own
        files_only = {"strict", "train", "valid", "reference", "prompts", "ptx_data", "judged", "ratings"}
        assert added <= files_only | {"demonstrations"}
    assert (SFTConfig().out, RMConfig().out, PPOConfig().out) == (Path("runs/sft"), Path("runs/rm"), Path("runs/ppo"))


def test_an_unknown_rollout_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="rollout"):
        load_trainer_config(env={"HEED_TRAINER_ROLLOUT": "tgi"})
