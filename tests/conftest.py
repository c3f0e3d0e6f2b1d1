"""Shared fixtures: a tiny random-weight Llama with the SmolLM2 tokenizer, and real servers.

A server is the real `heed serve` in a subprocess (real vLLM engine, real SQLite, real HTTP and
gRPC), started once per session; tests talk to it only through its public APIs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from heed.eventlog.postgres import create_database, drop_database
from heed.launcher import ServerProcess, ServeSpec, launch_server
from heed.models import build_tiny_llama, prepared_tokenizer

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEYS = {"alice": "sk-test-alice", "bob": "sk-test-bob"}


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return prepared_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-v1", tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def prepared_bundled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """`heed model prepare` into a fresh cache (about 30 s): the cache, the bundled
    SmolLM2-135M-Instruct's Hugging Face folder in it, and what the command printed."""
    cache = tmp_path_factory.mktemp("cache")
    result = subprocess.run(
        [sys.executable, "-m", "heed", "model", "prepare", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cache, cache / "models" / "SmolLM2-135M-Instruct", result.stdout + result.stderr


@pytest.fixture(scope="session")
def bundled_model(prepared_bundled: tuple[Path, Path, str]) -> Path:
    return prepared_bundled[1]


RunningServer = ServerProcess  # what the tests call a started `heed serve`

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def postgres() -> str:
    """A PostgreSQL server's URL: $HEED_TEST_POSTGRES_URL, else the throwaway cluster that
    `deploy/postgres-local start` runs on a local port (started here if it is not running)."""
    url = os.environ.get("HEED_TEST_POSTGRES_URL")
    if url:
        return url
    started = subprocess.run(
        [str(ROOT / "deploy" / "postgres-local"), "start"], capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, f"deploy/postgres-local start failed:\n{started.stderr[-3000:]}"
    return started.stdout.strip().splitlines()[-1]


def fresh_database(server_url: str) -> str:
    """A new, empty database on the PostgreSQL server at ``server_url``; its URL."""
    return create_database(server_url, "heed_test")


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a test's own event log lives: a SQLite file, or a fresh PostgreSQL database (the same
    contract tests run against both backends)."""
    if request.param == "sqlite":
        yield str(tmp_path / "events.db")
        return
    url = fresh_database(request.getfixturevalue("postgres"))
    yield url
    drop_database(url)


def run_heed(cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`heed ARGS` as a user runs it (no API keys in its environment), to its end; its output kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("HEED_API_KEYS", "HEED_SERVE_ALLOW_OPEN")}
    return subprocess.run(
        [sys.executable, "-m", "heed", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HEED_CACHE_DIR": str(cache_dir)},
    )


# Small engines that start fast: eager, 1 GiB of KV cache, short contexts, the canary slot loaded
# only when a canary starts (tests that want a warm one say so: later flags win).
TEST_ENGINE_FLAGS = ("--kv-cache-gib", "1", "--max-model-len", "512", "--max-num-seqs", "16", "--canary-slot", "lazy")


def start_server(
    model: Path,
    data_dir: Path,
    log_path: Path,
    keys: dict[str, str] | None,
    *extra: str,
    timeout: float = 300,
    admin_keys: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> RunningServer:
    """`heed serve` on ``model`` with the tests' engine settings and flags ``extra``, ready."""
    spec = ServeSpec(
        data_dir,
        log_path,
        model=str(model),
        keys=keys or {},
        admin_keys=admin_keys or {},
        enforce_eager=True,
        args=(*TEST_ENGINE_FLAGS, *extra),
        env=env or {},
        ready_timeout_s=timeout,
    )
    return launch_server(spec)


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tiny_model,
        tmp_path_factory.mktemp("data"),
        ARTIFACTS / "server.log",
        KEYS,
        *("--pin-principals", "alice", "--engine-stats"),
    )
    yield running
    running.stop()
    # Stopping is part of the contract too: a clean exit on SIGTERM.
    assert running.process.returncode == 0, running.log_text()[-3000:]


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, headers=server.headers("alice"), timeout=60) as client:
        yield client


# As root in a container with no network: no sandbox, and none of Chromium's calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's headless Chromium, driven by Playwright (no browser of Playwright's own). Per
    module: Playwright's sync API must not outlive the module into tests that run event loops."""
    chromium = os.environ.get("HEED_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Debian's chromium is not installed: `make browser` installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


# Fixtures that boot a real vLLM engine (a `heed serve`). Files that start servers or engines, or
# train for long, themselves say `pytestmark = pytest.mark.slow`.
ENGINE_FIXTURES = {"server", "ui_server", "swap_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow every test that uses an engine-booting fixture, directly or through another
    fixture: `pytest -m "not slow"` is the fast layer, with no engine in it."""
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def bf16_setting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Sets HEED_NATIVE_BF16 for the test (heed.hardware.native_bf16 is read once, so its cache
    is cleared at each setting and after the test)."""
    from heed.hardware import native_bf16

    def setting(value: str) -> None:
        monkeypatch.setenv("HEED_NATIVE_BF16", value)
        native_bf16.cache_clear()

    yield setting
    native_bf16.cache_clear()
