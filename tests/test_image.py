"""The container image's Dockerfile, read as docker would (no image is built here: this machine
has no container builder; docs/deploy.md says how to build it)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (raw.startswith("#") or not raw.strip()):
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_it_copies_what_exists_and_builds_either_variant() -> None:
    steps = instructions()
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            assert all((ROOT / s).exists() for s in sources), args
    args = {a.split("=")[0]: a.split("=")[1] for op, a in steps if op == "ARG" and "=" in a}
    assert args["VARIANT"] == "cpu"
    script = " ".join(a for op, a in steps if op == "RUN")
    assert "requirements/cpu.lock" in script and '".[gpu]"' in script and "cuda)" in script


def test_it_runs_as_a_user_with_its_data_and_cache_as_volumes_and_a_health_check() -> None:
    steps = final_stage()
    users = [a for op, a in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = dict(pair.split("=", 1) for op, a in steps if op == "ENV" for pair in shlex.split(a) if "=" in pair)
    (volumes,) = [json.loads(a) for op, a in steps if op == "VOLUME"]
    # Where heed puts its data directory and model cache under this environment is in a volume.
    probe = subprocess.run(
        [sys.executable, "-c", "from heed.datadir import default_data_dir; from heed.config import default_cache_dir;"
         "print(default_data_dir()); print(default_cache_dir())"],
        env={**os.environ, **{k: v for k, v in env.items() if k != "PATH"}},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    data_dir, cache_dir = probe.stdout.split()
    assert data_dir in volumes and cache_dir in volumes
    (health,) = [a for op, a in steps if op == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in health
    assert any(op == "RUN" and a.strip() == "heed model prepare" for op, a in steps)  # the model in the image


def test_its_entrypoint_and_command_are_a_heed_command_line() -> None:
    from heed.cli import build_parser

    steps = final_stage()
    (entrypoint,) = [json.loads(a) for op, a in steps if op == "ENTRYPOINT"]
    (command,) = [json.loads(a) for op, a in steps if op == "CMD"]
    assert entrypoint == ["heed"]
    args = build_parser().parse_args(command)  # exits (fails the test) on an unknown flag
    assert args.command == "serve" and "--host" in command and "0.0.0.0" in command
