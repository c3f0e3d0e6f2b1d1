"""Configuration: defaults, then a TOML file, then HEED_<SECTION>_<FIELD>, then flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from heed import config
from heed.cli import build_parser
from serving.config import ServeConfig


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
