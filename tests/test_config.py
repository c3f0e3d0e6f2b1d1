"""Configuration: defaults, then a TOML file, then HEED_<SECTION>_<FIELD>, then flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import pytest

from heed import config
from heed.cli import build_parser
from serving.config import ServeConfig
from tests.conftest import run_heed


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "heed.toml"
    toml.write_text("[serve]\nhttp_port = 9001\ngrpc_port = 9002\nmax_n = 4\nenforce_eager = true\n")
    monkeypatch.setenv("HEED_SERVE_GRPC_PORT", "9102")
    monkeypatch.setenv("HEED_SERVE_MAX_N", "5")

    cfg = config.load(ServeConfig, "serve", parse(["--max-n", "6"]), toml)

    assert (cfg.http_port, cfg.grpc_port, cfg.max_n, cfg.enforce_eager) == (9001, 9102, 6, True)
    assert cfg.host == ServeConfig().host


def test_a_given_environment_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEED_SERVE_MAX_N", "5")
    monkeypatch.setenv("HEED_SERVE_HTTP_PORT", "9101")

    cfg = config.load(ServeConfig, "serve", env={"HEED_SERVE_MAX_N": "7"})

    assert (cfg.max_n, cfg.http_port) == (7, ServeConfig().http_port)
    assert config.load(ServeConfig, "serve").max_n == 5  # without env=, os.environ as before


def test_a_bad_value_or_unknown_key_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "heed.toml"
    toml.write_text("[serve]\nhttp_prot = 1\n")
    with pytest.raises(ValueError, match="unknown keys in \\[serve\\]: http_prot"):
        config.load(ServeConfig, "serve", parse([]), toml)

    monkeypatch.setenv("HEED_SERVE_HTTP_PORT", "eighty")
    with pytest.raises(ValueError, match="http_port"):
        config.load(ServeConfig, "serve", parse([]))


def test_boolean_flags_have_a_negative_form() -> None:
    assert config.load(ServeConfig, "serve", parse(["--no-enforce-eager"])).enforce_eager is False
    assert config.load(ServeConfig, "serve", parse(["--enforce-eager"])).enforce_eager is True


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_warned", set())  # each variable is reported once per process


def test_a_misspelled_variable_is_reported_with_the_nearest_setting(
    caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    env = {"HEED_SERVE_HTTP_PROT": "9000", "HEED_SERV_MAX_N": "3", "HEED_SERVE_MAX_N": "7", "HEED_SERVE_XYZZY": "1"}

    with caplog.at_level(logging.WARNING, logger="heed.config"):
        cfg = config.load(ServeConfig, "serve", env=env)

    assert cfg.http_port == ServeConfig().http_port and cfg.max_n == 7
    assert sorted(r.getMessage() for r in caplog.records) == [
        "ignoring HEED_SERVE_HTTP_PROT: [serve] has no such setting; did you mean HEED_SERVE_HTTP_PORT?",
        "ignoring HEED_SERVE_XYZZY: [serve] has no such setting",
        "ignoring HEED_SERV_MAX_N: [serve] has no such setting; did you mean HEED_SERVE_MAX_N?",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heed.config"):
        config.load(ServeConfig, "serve", env=env)
    assert not caplog.records  # once per variable, however often a section is loaded


def test_other_sections_and_known_variables_are_not_reported(
    caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    env = {
        "HEED_TRAINER_POLL_S": "5",
        "HEED_TRAINER_NO_SUCH_SETTING": "1",  # the trainer's business, not serve's
        "HEED_SFT_LR": "1e-5",
        "HEED_PPO_KL_COEF": "0.1",
        "HEED_API_KEYS": "alice:sk-1",
        "HEED_ADMIN_KEYS": "ops:sk-2",
        "HEED_ADMIN_KEY": "sk-2",
        "HEED_CACHE_DIR": "/tmp",
        "HEED_URL": "http://127.0.0.1:8000",
        "HEED_RUN_EXPERIMENT": "1",
        "HEED_TEST_CHROMIUM": "1",
        "HEED_SOMETHING_ELSE": "1",  # near no setting: not ours to judge
        "HEED_SERVE_HTTP_PORT": "9000",
    }

    with caplog.at_level(logging.WARNING, logger="heed.config"):
        assert config.load(ServeConfig, "serve", env=env).http_port == 9000

    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_percent_sign_in_help_is_printed_as_is(capsys: pytest.CaptureFixture[str]) -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        share: float = config.option(5.0, "the canary's share in % (50% means half)")
        label: str = config.option("100%", "a default with a percent sign")

    parser = argparse.ArgumentParser(prog="odd")
    config.add_arguments(parser, Odd)
    text = " ".join(parser.format_help().split())
    assert "in % (50% means half) (default: 5.0)" in text and "(default: 100%)" in text

    with pytest.raises(SystemExit):
        parse(["--help"])
    serve_help = " ".join(capsys.readouterr().out.split())
    assert "generates ~20% slower (default: False)" in serve_help and "{'" not in serve_help


def test_serve_with_a_missing_model_folder_is_a_one_line_error(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_heed(
        tmp_path / "cache", "serve", "--model", str(tmp_path / "no-such-dir"), "--data-dir", str(tmp_path / "data")
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"heed: error: no model folder at {tmp_path / 'no-such-dir'} (give a Hugging Face model folder with a "
        "config.json, or leave the model empty for the bundled SmolLM2-135M-Instruct)"
    ]
    assert not (tmp_path / "data").exists()  # it failed before touching the data directory or an engine
    assert time.monotonic() - started < 30


def test_a_folder_without_config_json_is_not_a_model(tmp_path: Path) -> None:
    from heed.models import ModelNotFound, resolve_model

    (tmp_path / "weights").mkdir()
    (tmp_path / "file.gguf").write_text("")
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model(str(tmp_path / "weights"))
    with pytest.raises(ModelNotFound, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "file.gguf"))
    with pytest.raises(ModelNotFound, match="no model folder at ./nowhere"):
        resolve_model("./nowhere")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id
    (tmp_path / "weights" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "weights")) == tmp_path / "weights"


def test_a_setting_with_named_choices_takes_only_those_from_every_source(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.load(ServeConfig, "serve", env={"HEED_SERVE_CANARY_SLOT": "lazy"}).canary_slot == "lazy"
    with pytest.raises(ValueError, match="canary_slot: 'hot' is not one of warm, lazy"):
        config.load(ServeConfig, "serve", env={"HEED_SERVE_CANARY_SLOT": "hot"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--canary-slot", "hot"])
