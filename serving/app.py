"""`heed serve`: one process running the HTTP and gRPC servers over one engine and event log.

The servers start first (so /health answers and /ready says "loading"), then the engine loads;
readiness flips when it is serving. SIGTERM/SIGINT drain gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import uvicorn

from heed.datadir import DataDir, exclusive_lock, lock_holder, registry_location
from heed.eventlog import is_database_url, log_location, open_store, redacted
from heed.eventlog.postgres import CONTROLLER_LOCK, Leadership
from heed.gpu import check_gpu_shares, gpu_count
from heed.models import resolve_model
from heed.registry import PolicyRegistry
from heed.rollout import RolloutState, StaleRollout, open_rollout_store
from serving.adapters import AdapterEngine
from serving.auth import ApiKeys, is_loopback
from serving.config import ServeConfig
from serving.controller import initial_state
from serving.engine import EngineSlot, in_daemon_thread
from serving.grpc.server import follow_health, set_health, start_grpc
from serving.http.api import build_app
from serving.service import Service, engine_settings, gpu_shares
from serving.service import health as service_health
from serving.slots import kill_engine_processes
from serving.tool_parsing import load_parser

log = logging.getLogger("heed.serve")


SHUTDOWN_S = 10.0  # SIGTERM to exit, whatever the server was doing
DRAIN_S = 4.0  # of which in-flight requests may take this long to finish


class _HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # serve() handles SIGTERM/SIGINT for the HTTP and gRPC servers together


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (the trainer's stage processes too)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _policy_version(cfg: ServeConfig, model: Path | str) -> str:
    return cfg.policy_version or (model.name if isinstance(model, Path) else str(model).rsplit("/", 1)[-1])


def _stable_policy(cfg: ServeConfig, registry: PolicyRegistry, state: RolloutState) -> tuple[Path | str, str]:
    """The folder and version to serve as stable: the rollout state's, else ``--model`` imported
    into the registry as the first version."""
    if state.stable:  # a corrupt stable version is never served, nor an adapter by a full-weight server
        folder = registry.verify_for(state.stable, cfg.policy_mode)
        log.info("serving stable version %s from the registry (rollout state)", state.stable)
        return folder, state.stable
    model = resolve_model(cfg.model, cfg.cache_dir)
    version = _policy_version(cfg, model)
    if not isinstance(model, Path):  # a hub id: served as is, outside the loop
        log.warning("%s is not a local folder: it is served but not entered in the registry", model)
        return model, version
    log.info("entering %s into the policy registry as %s", model, version)
    registry.import_base(model, version)
    return registry.verify(version), version


def _adapter_engine(cfg: ServeConfig, registry: PolicyRegistry, model: Path | str, version: str) -> AdapterEngine:
    """Adapter mode's one engine: on the stable version's base (the stable itself, when it is a
    full version)."""
    if not isinstance(model, Path):
        raise ValueError(f"adapter mode serves versions of the registry: give --model a local folder, not {model}")
    manifest = registry.manifest(version)
    base = registry.verify_full(manifest.base or version) if manifest.mode == "adapter" else model
    engine = EngineSlot("engine", base, manifest.base or version, engine_settings(cfg))
    return AdapterEngine(engine, DataDir(cfg.data_dir).engine_weights("adapters"))


def _start_trainer(cfg: ServeConfig, config_file: Path | None) -> subprocess.Popen[bytes]:
    """`heed trainer` on the same data directory, in its own process (its memory and its lower
    CPU priority are its own)."""
    command = [sys.executable, "-m", "heed", "trainer", "--data-dir", str(cfg.data_dir)]
    if config_file is not None:
        command += ["--config", str(config_file)]
    log.info("starting the co-located trainer: %s", " ".join(command))
    # The same event log, through the environment (a database URL may hold a password: not argv).
    env = {
        **os.environ,
        "HEED_TRAINER_EVENT_LOG": log_location(cfg.event_log, cfg.data_dir),
        "HEED_TRAINER_REGISTRY": str(registry_location(cfg.registry, cfg.data_dir)),
        # Its rollout engine's share of a GPU is the server's to give: checked with the slots'.
        "HEED_TRAINER_ROLLOUT_GPU_MEMORY_UTILIZATION": str(cfg.trainer_gpu_memory_utilization),
    }
    return subprocess.Popen(command, env=env)


async def serve(cfg: ServeConfig, config_file: Path | None = None) -> bool:
    """Serve until SIGTERM/SIGINT; returns whether an engine start was abandoned on the way out
    (its thread cannot be stopped: the caller ends the process without waiting for it)."""
    if cfg.tool_call_parser:
        load_parser(cfg.tool_call_parser)  # an unknown name fails before anything starts
    check_gpu_shares(gpu_shares(cfg), gpu_count())
    keys = ApiKeys.load(cfg.api_keys_file)
    admin_keys = ApiKeys.load(cfg.admin_keys_file, table="admin_keys", env="HEED_ADMIN_KEYS")
    if keys.overlaps(admin_keys):
        raise ValueError("an admin key must not also be an API key")
    if keys.open and not is_loopback(cfg.host) and not cfg.allow_open:
        raise ValueError(
            f"no API keys are configured, so heed listens on loopback only, not on {cfg.host}: set "
            "HEED_API_KEYS='principal:key,...' (or --api-keys-file), or pass --allow-open to serve everyone"
        )
    data_dir = DataDir(cfg.data_dir)
    try:  # held until the process ends: two servers never share one log, registry and rollout
        lock = exclusive_lock(data_dir.serve_lock)
    except BlockingIOError:
        raise ValueError(
            f"{lock_holder(data_dir.serve_lock)} already serves {cfg.data_dir}; stop it or give another --data-dir"
        ) from None
    if admin_keys.open:
        log.warning("no admin key configured: the admin API (/admin/..., heed.v1.Rollout) is off (HEED_ADMIN_KEYS)")
    if keys.open:
        log.warning("=" * 78)
        log.warning("NO API KEYS CONFIGURED: the service is OPEN; anyone who can reach %s may use it.", cfg.host)
        log.warning("Set HEED_API_KEYS='principal:key,...' or --api-keys-file before exposing it.")
        log.warning("=" * 78)
    registry = PolicyRegistry(registry_location(cfg.registry, cfg.data_dir))
    event_log = log_location(cfg.event_log, cfg.data_dir)
    store = await asyncio.to_thread(open_store, event_log)
    log.info("event log: %s (%d records); registry: %s", redacted(event_log), store.last_seq(), registry.root)
    rollouts = await asyncio.to_thread(open_rollout_store, event_log, cfg.data_dir)
    state, revision = await asyncio.to_thread(rollouts.load)
    model, version = await asyncio.to_thread(_stable_policy, cfg, registry, state)
    adapters = None
    if cfg.policy_mode == "adapter":  # one engine on the base; the slots are views of it
        adapters = await asyncio.to_thread(_adapter_engine, cfg, registry, model, version)
    slot = (
        adapters.view("stable", version)
        if adapters is not None
        else EngineSlot("stable", model, version, engine_settings(cfg), data_dir.engine_weights("stable"))
    )
    # Replicas of one database: one controller decides at a time, every replica follows.
    leadership = Leadership(event_log, CONTROLLER_LOCK) if is_database_url(event_log) else None
    service = Service.build(
        cfg, keys, admin_keys, store, slot, registry, rollouts, leadership.check if leadership else None, adapters
    )
    first = None
    if not state.stable:
        sequence = registry.manifest(version).sequence if isinstance(model, Path) else 0
        first = initial_state(state, version, sequence, cfg.policy_mode)
    elif state.mode != cfg.policy_mode:  # the trainer makes versions of the mode the rollout state says
        log.info("serving in %s mode (the rollout state said %s)", cfg.policy_mode, state.mode)
        first = replace(state, mode=cfg.policy_mode)
    if first is not None:
        with contextlib.suppress(StaleRollout):  # another replica of the database started first: follow it
            await asyncio.to_thread(rollouts.save, first, revision)
    await asyncio.to_thread(service.rollout.load)

    http = _HttpServer(
        uvicorn.Config(
            build_app(service),
            host=cfg.host,
            port=cfg.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # The requests' limit is RequestLimit's (an OpenAI-shaped 503); uvicorn's, above it, holds
            # connections (idle keep-alive ones too) and the probes that RequestLimit lets through.
            limit_concurrency=2 * cfg.max_connections + 64,
        )
    )
    grpc_server, health = await start_grpc(service, cfg.host, cfg.grpc_port)
    http_task = asyncio.create_task(http.serve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "HTTP on http://%s:%d  gRPC on %s:%d  (loading the engine...)", cfg.host, cfg.http_port, cfg.host, cfg.grpc_port
    )
    trainer: subprocess.Popen[bytes] | None = None
    controller: asyncio.Task[None] | None = None
    watch_health: asyncio.Task[None] | None = None
    try:
        load = asyncio.create_task(in_daemon_thread(slot.start))
        done, _ = await asyncio.wait(
            {load, asyncio.create_task(stop.wait()), http_task}, return_when=asyncio.FIRST_COMPLETED
        )
        if load in done:
            load.result()  # raise a loading failure
            if adapters is not None:  # the engine is up on the base: the stable's adapter goes in
                assert isinstance(model, Path)
                await service.slots.load("stable", version, model)
            service.metrics.engine_ready.labels(slot.name, slot.policy_version).set(1)
            if leadership is not None:  # one of several replicas: load what the shared state names, decide nothing
                with contextlib.suppress(Exception):  # logged and retried by follow(); serving starts regardless
                    await service.rollout.follow()
            elif service.rollout.state.canary:  # a rollout that was under way when the server stopped
                await service.rollout.resume_canary()
            now = await service_health(service.slots, service.writer)
            await set_health(health, now.ready)  # before the log line anyone waits for
            watch_health = asyncio.create_task(follow_health(service, health, stop))
            log.info("ready: serving %s as %r (alias %r)", model, slot.policy_version, cfg.served_model_name)
            if cfg.with_trainer:  # first: the warm-up below lowers the priority of what starts after it
                trainer = _start_trainer(cfg, config_file)
            if cfg.canary_slot == "warm":
                service.slots.warm_canary(cfg.canary_warm_idle_s)
            controller = asyncio.create_task(service.rollout.run(cfg.rollout_interval_s, stop))
            await asyncio.wait({asyncio.create_task(stop.wait()), http_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task.done() and http_task.exception():
            raise http_task.exception()  # type: ignore[misc]
    finally:
        # Within SHUTDOWN_S in any state (serving, swapping, a canary engine still starting):
        # requests get DRAIN_S to finish, the engines are stopped, nothing is left behind.
        log.info("shutting down: draining requests")
        deadline = time.monotonic() + SHUTDOWN_S
        stop.set()
        if trainer is not None and trainer.poll() is None:
            trainer.terminate()  # it stops between two stages, or at once on a second signal
        if watch_health is not None:
            await watch_health
        await health.enter_graceful_shutdown()
        http.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(grpc_server.stop(grace=DRAIN_S), http_task), timeout=DRAIN_S + 1)
        if controller is not None:
            controller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await controller
        abandoned = await service.slots.close(timeout_s=max(1.0, deadline - time.monotonic() - 1))
        service.writer.close()
        rollouts.close()
        if leadership is not None:
            leadership.close()
        if trainer is not None:
            try:
                trainer.wait(timeout=max(0.5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("the trainer did not stop in time; killing it (its round is lost, nothing else)")
                kill_tree(trainer.pid)
                trainer.wait()
        kill_engine_processes()  # of an engine start that outlived the slots' close, if any
        lock.close()
        log.info("stopped")
    return abandoned


def run(cfg: ServeConfig, config_file: Path | None = None) -> int:
    if asyncio.run(serve(cfg, config_file)):
        # An engine start is still running on its thread: exit now, not when it gives up (its
        # processes are killed; the log, the registry and the rollout state are closed and durable).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
