"""Faults a real server meets, and what its probes and callers see: the event log locked by another
process or on a full disk (a counted 503, not ready, then ready again by itself), and a dead engine (liveness and
gRPC health fail, so an orchestrator restarts the process)."""

from __future__ import annotations

import resource
import signal
import sqlite3
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ARTIFACTS, start_server

pytestmark = pytest.mark.slow  # starts its own `heed serve`
OK = {"model": "heed", "prompt": "hi", "max_tokens": 2}


def metric(http: httpx.Client, name: str) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(name)]
    return sum(float(line.split()[-1]) for line in lines)


def grpc_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(reply.status)


def wait_until(check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def test_a_locked_log_then_a_dead_engine_are_told_by_the_probes(tiny_model, tmp_path) -> None:
    server = start_server(tiny_model, tmp_path / "data", ARTIFACTS / "server-faults.log", keys=None)
    try:
        with httpx.Client(base_url=server.http_url, timeout=60) as http:
            assert http.post("/v1/completions", json=OK).status_code == 200
            assert grpc_status(server.grpc_target) == health_pb2.HealthCheckResponse.SERVING

            # Another process holds the log's write lock: writes fail fast with 503, counted.
            holder = sqlite3.connect(server.data.events, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            try:
                started = time.monotonic()
                refused = http.post("/v1/completions", json=OK)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "event_log_unavailable"
                assert time.monotonic() - started < 15  # the busy timeout, not 30 s and more
                assert metric(http, "heed_event_log_write_failures_total") == 1
                ready = http.get("/ready")
                assert ready.status_code == 503 and ready.json()["event_log"]["writable"] is False
                assert http.get("/health").status_code == 200  # alive: nothing a restart would fix
                wait_until(lambda: grpc_status(server.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            wait_until(lambda: http.get("/ready").status_code == 200)  # its probe finds the log writable
            assert http.post("/v1/completions", json=OK).status_code == 200
            wait_until(lambda: grpc_status(server.grpc_target) == health_pb2.HealthCheckResponse.SERVING)

            # The disk is full: the kernel refuses every write the server process makes to its files
            # (RLIMIT_FSIZE 0: EFBIG, which SQLite reports as "database or disk is full").
            resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            try:
                refused = http.post("/v1/completions", json=OK)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "event_log_unavailable"
                assert metric(http, "heed_event_log_write_failures_total") == 2
                wait_until(lambda: http.get("/ready").status_code == 503)
                assert http.get("/health").status_code == 200
            finally:
                resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            wait_until(lambda: http.get("/ready").status_code == 200)  # space again: ready by itself
            assert http.post("/v1/completions", json=OK).status_code == 200

            # The engine's process dies: liveness fails, and gRPC health with it.
            engines = [p for p in psutil.Process(server.pid).children(recursive=True) if "EngineCore" in p.name()]
            assert engines, [p.name() for p in psutil.Process(server.pid).children(recursive=True)]
            for engine in engines:
                engine.send_signal(signal.SIGKILL)
            wait_until(lambda: http.get("/health").status_code == 503)
            assert http.get("/health").json()["dead_engines"] == ["stable"]
            assert http.get("/ready").status_code == 503
            wait_until(lambda: grpc_status(server.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert server.process.poll() is None  # still answering: the probes say what is wrong
    finally:
        server.stop()


def test_sigterm_while_the_canary_engine_starts_exits_within_10_s_leaving_no_engine(tiny_model, tmp_path) -> None:
    started = time.time()
    server = start_server(
        tiny_model, tmp_path / "data", ARTIFACTS / "server-shutdown.log", None, "--canary-slot", "warm"
    )
    wait_until(lambda: "starting engine slot 'canary'" in server.log_text())  # after 2 s without requests
    time.sleep(1.0)  # the canary slot's engine is starting now
    assert "the canary slot is warm" not in server.log_text()
    stopping = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=60)
    took = time.monotonic() - stopping

    assert server.process.returncode == 0, server.log_text()[-3000:]
    assert took < 10, took
    left = []
    for process in psutil.process_iter(["name", "create_time"]):
        if process.info["create_time"] >= started and "EngineCore" in (process.info["name"] or ""):
            left.append(process.pid)
    assert left == []
    assert "the canary slot is warm" not in server.log_text()  # it was stopped while starting
    server.stop()
