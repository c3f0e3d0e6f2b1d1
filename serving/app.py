"""`heed serve`: one process running the HTTP and gRPC servers over one engine and event log.

The servers start first (so /health answers and /ready says "loading"), then the engine loads;
readiness flips when it is serving. SIGTERM/SIGINT drain gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from heed.eventlog import open_store
from heed.models import resolve_model
from serving.auth import ApiKeys
from serving.config import ServeConfig
from serving.engine import EngineSettings, EngineSlot
from serving.grpc.server import mark_serving, start_grpc
from serving.http.api import build_app
from serving.service import Service

log = logging.getLogger("heed.serve")


class _HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # serve() handles SIGTERM/SIGINT for the HTTP and gRPC servers together


def _policy_version(cfg: ServeConfig, model: Path | str) -> str:
    return cfg.policy_version or (model.name if isinstance(model, Path) else str(model).rsplit("/", 1)[-1])


async def serve(cfg: ServeConfig) -> None:
    keys = ApiKeys.load(cfg.api_keys_file)
    if keys.open:
        log.warning("=" * 78)
        log.warning("NO API KEYS CONFIGURED: the service is OPEN; anyone who can reach %s may use it.", cfg.host)
        log.warning("Set HEED_API_KEYS='principal:key,...' or --api-keys-file before exposing it.")
        log.warning("=" * 78)
    model = await asyncio.to_thread(resolve_model, cfg.model, cfg.cache_dir)
    settings = EngineSettings(
        max_model_len=cfg.max_model_len,
        kv_cache_gib=cfg.kv_cache_gib,
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager,
        max_num_seqs=cfg.max_num_seqs,
        seed=cfg.seed,
    )
    slot = EngineSlot("stable", model, _policy_version(cfg, model), settings)
    store = open_store(cfg.data_dir / "events.db")
    log.info("event log: %s (%d records)", cfg.data_dir / "events.db", store.last_seq())
    service = Service.build(cfg, keys, store, {"stable": slot})

    http = _HttpServer(
        uvicorn.Config(
            build_app(service), host=cfg.host, port=cfg.http_port, log_level="warning", access_log=False, lifespan="off"
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
    try:
        load = asyncio.create_task(asyncio.to_thread(slot.start))
        done, _ = await asyncio.wait(
            {load, asyncio.create_task(stop.wait()), http_task}, return_when=asyncio.FIRST_COMPLETED
        )
        if load in done:
            load.result()  # raise a loading failure
            service.metrics.engine_ready.labels(slot.name, slot.policy_version).set(1)
            await mark_serving(health)
            log.info("ready: serving %s as %r (alias %r)", model, slot.policy_version, cfg.served_model_name)
            await asyncio.wait({asyncio.create_task(stop.wait()), http_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task.done() and http_task.exception():
            raise http_task.exception()  # type: ignore[misc]
    finally:
        log.info("shutting down: draining requests")
        await health.enter_graceful_shutdown()
        http.should_exit = True
        await grpc_server.stop(grace=5)
        await asyncio.wait_for(http_task, timeout=10)
        slot.shutdown()
        service.writer.close()
        log.info("stopped")


def run(cfg: ServeConfig) -> int:
    asyncio.run(serve(cfg))
    return 0
