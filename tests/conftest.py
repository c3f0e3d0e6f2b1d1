"""Shared fixtures: a tiny random-weight Llama with the SmolLM2 tokenizer, and real servers.

A server is the real `heed serve` in a subprocess (real vLLM engine, real SQLite, real HTTP and
gRPC), started once per session; tests talk to it only through its public APIs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from heed.models import build_tiny_llama, prepared_tokenizer

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEYS = {"alice": "sk-test-alice", "bob": "sk-test-bob"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return prepared_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-v1", tokenizer_dir, seed=0)


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    http_url: str
    grpc_target: str
    data_dir: Path
    log_path: Path
    keys: dict[str, str] = field(default_factory=dict)
    admin_keys: dict[str, str] = field(default_factory=dict)

    def headers(self, principal: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[principal]}"} if self.keys else {}

    def admin_headers(self, name: str = "ops") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_keys[name]}"} if self.admin_keys else {}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server (SIGKILL: its whole process group, as a crash would), then reap all."""
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # engine processes must not outlive a test
            os.killpg(self.process.pid, signal.SIGKILL)


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
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "HEED_API_KEYS": ",".join(f"{p}:{k}" for p, k in (keys or {}).items()),
        "HEED_ADMIN_KEYS": ",".join(f"{p}:{k}" for p, k in (admin_keys or {}).items()),
        **(env or {}),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "heed",
                "serve",
                "--model",
                str(model),
                "--data-dir",
                str(data_dir),
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
                "--enforce-eager",
                "--kv-cache-gib",
                "1",
                "--max-model-len",
                "512",
                "--max-num-seqs",
                "16",
                "--canary-slot",  # tests that want a warm canary engine say so
                "lazy",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = RunningServer(
        process,
        f"http://127.0.0.1:{http_port}",
        f"127.0.0.1:{grpc_port}",
        data_dir,
        log_path,
        dict(keys or {}),
        dict(admin_keys or {}),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"heed serve exited with {process.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(server.http_url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"heed serve was not ready in {timeout}s:\n{server.log_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tiny_model, tmp_path_factory.mktemp("data"), ARTIFACTS / "server.log", KEYS)
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
