"""The engine slots: "stable" and, once there is one, "canary", each a hot-swappable vLLM engine.

This module loads versions into slots (a swap in place, or the slot's first engine start), warms
the canary slot on stable's weights in the background so that a new version goes live by a swap,
finds the slot serving a version, and shuts them all down. It decides nothing: the rollout
controller (serving.controller) says what goes where, the router (serving.router) says which slot
answers a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from heed.datadir import DataDir
from heed.rollout import SlotStatus
from serving.adapters import AdapterEngine
from serving.engine import EngineSettings, EngineSlot, check_compatible, in_daemon_thread
from serving.errors import NotFound
from serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)

SlotName = Literal["stable", "canary"]
SLOT_NAMES: tuple[SlotName, ...] = ("stable", "canary")


# Makes a slot's engine: (name, model folder, policy version, settings, swap-weights folder).
SlotFactory = Callable[[str, Path, str, EngineSettings, Path], EngineSlot]


class Slots:
    """The server's engine slots; the stable slot exists from the start. ``new_slot`` makes a new
    slot's engine (vLLM's, but for the fast tests' fake engine). In adapter mode (``adapters``:
    the one engine) the slots are views of that engine, and a load re-points one."""

    def __init__(
        self,
        stable: EngineSlot,
        settings: EngineSettings,
        data_dir: Path,
        metrics: ServiceMetrics,
        new_slot: SlotFactory = EngineSlot,
        engine_stats: bool = False,
        adapters: AdapterEngine | None = None,
    ) -> None:
        self._slots: dict[str, EngineSlot] = {"stable": stable}
        self.adapters = adapters
        # Each engine's per-step stats to the metrics (None: the engines keep none).
        self.on_stats = metrics.observe_engine if engine_stats else None
        stable.on_stats = self.on_stats
        if adapters is not None:  # one engine: its stats are labelled slot="engine"
            adapters.slot.on_stats = self.on_stats
        self.new_slot = new_slot
        self.settings = settings
        self.data_dir = DataDir(data_dir)
        self.metrics = metrics
        self._warming: asyncio.Task[EngineSlot] | None = None
        self._warm_started = False  # the warm-up's engine start has begun (it waits for a quiet moment first)

    # ---- lookup --------------------------------------------------------------------------
    @property
    def stable(self) -> EngineSlot:
        return self._slots["stable"]

    @property
    def canary(self) -> EngineSlot | None:
        return self._slots.get("canary")

    def items(self) -> list[tuple[str, EngineSlot]]:
        return list(self._slots.items())

    def serving(self) -> list[EngineSlot]:
        """The slots with a running engine, stable first."""
        slots = (self._slots.get(name) for name in SLOT_NAMES)
        return [s for s in slots if s is not None and s.engine is not None and s.policy_version]

    def in_flight(self) -> int:
        """Requests holding a lease on any slot (admitted, not yet logged)."""
        if self.adapters is not None:  # the views, and the pinned views of resident versions
            return self.adapters.in_flight()
        return sum(len(slot._leases) for slot in self._slots.values())

    def served_versions(self) -> list[str]:
        """The versions a request may name: the slots', then (adapter mode) the other resident
        ones that stay (the previous stable, the base)."""
        versions: list[str] = []
        for slot in self.serving():
            if slot.policy_version not in versions:
                versions.append(slot.policy_version)
        if self.adapters is not None and versions:
            kept = self.adapters.keep()
            versions += sorted(v for v in self.adapters.resident if v in kept and v not in versions)
        return versions

    def for_version(self, version: str) -> EngineSlot:
        """The slot serving ``version`` (stable's first when both do); in adapter mode, else a view of
        its resident adapter (the previous stable, the base); NotFound when none does."""
        for slot in self.serving():
            if slot.policy_version == version:
                return slot
        if self.adapters is not None and self.serving():
            pinned = self.adapters.pinned(version)
            if pinned is not None:
                return pinned
        served = ", ".join(self.served_versions())
        raise NotFound(f"The model '{version}' does not exist; served: {served}", param="model", code="model_not_found")

    def status(self) -> tuple[SlotStatus, ...]:
        return tuple(SlotStatus(name, s.policy_version, s.ready, s.swapping) for name, s in self._slots.items())

    # ---- loading -------------------------------------------------------------------------
    def idle_for(self) -> float:
        """Seconds since the last request took or gave back a lease; 0 while any is in flight."""
        if self.in_flight():
            return 0.0
        return time.monotonic() - max(slot.last_active for slot in self._slots.values())

    def warm_canary(self, when_idle_s: float = 0.0) -> None:
        """Start the canary slot's engine on the stable version, in the background, so that a new
        version goes live by a swap (about a second) instead of an engine start (tens of seconds):
        once no request has been in flight for ``when_idle_s`` seconds, at the lowest CPU priority.
        A canary that comes first starts its own engine instead (``load``)."""
        stable = self.stable
        if self.adapters is not None:  # one engine serves every version
            return
        if "canary" in self._slots or self._warming is not None or not isinstance(stable.model, Path):
            return
        slot = self.new_slot(
            "canary", stable.model, stable.policy_version, self.settings, self.data_dir.engine_weights("canary")
        )
        slot.on_stats = self.on_stats

        called = time.monotonic()

        async def warm() -> EngineSlot:  # quiet for when_idle_s from now: traffic right after /ready comes first
            while (idle := min(self.idle_for(), time.monotonic() - called)) < when_idle_s:
                await asyncio.sleep(min(1.0, max(0.05, when_idle_s - idle)))
            self._warm_started = True
            log.info("warming up the canary slot (no request for %.1f s)", self.idle_for())
            await in_daemon_thread(lambda: slot.start(background=True))  # serving goes first
            self._slots.setdefault("canary", slot)
            self.metrics.engine_ready.labels("canary", slot.policy_version).set(1)
            log.info("the canary slot is warm (on %s)", slot.policy_version)
            return slot

        self._warming = asyncio.get_running_loop().create_task(warm())

    def _cancel_waiting_warm_up(self) -> None:
        """Drop a warm-up still waiting for a quiet moment (it has started no engine)."""
        if self._warming is not None and not self._warm_started:
            self._warming.cancel()
            self._warming = None

    async def load(self, name: SlotName, version: str, folder: Path) -> float:
        """Put ``version`` into the slot: a swap in place, or the slot's first engine. Returns the
        seconds the slot was closed to new requests (a swap) or took to start (a new engine)."""
        started = time.monotonic()
        if name == "canary":
            self._cancel_waiting_warm_up()  # this canary starts its own engine
        if name == "canary" and self._warming is not None:
            try:
                await self._warming  # a warm-up under way: swap into it once it is up
            except Exception:
                log.exception("warming up the canary slot failed; starting it on %s instead", version)
            self._warming = None
        slot = self._slots.get(name)
        if slot is None and self.adapters is not None:
            slot = self._slots[name] = self.adapters.view(name)
        if slot is None or slot.engine is None:
            stable = self._slots.get("stable")
            if name != "stable" and stable is not None:
                # Its own engine could serve any model, but a canary is promoted by a swap into the
                # stable engine: refuse now what that swap would refuse.
                check_compatible(getattr(stable, "built_for", None) or stable.model, folder)
            slot = self.new_slot(name, folder, version, self.settings, self.data_dir.engine_weights(name))
            slot.on_stats = self.on_stats
            await in_daemon_thread(slot.start)
            self._slots[name] = slot
            seconds = time.monotonic() - started
        else:
            old = slot.policy_version
            try:
                seconds = await slot.swap(version, folder)
            except Exception:
                self.metrics.policy_swaps.labels(name, "failed").inc()
                if not old:  # a new adapter view that never served: gone again
                    del self._slots[name]
                raise
            self.metrics.policy_swaps.labels(name, "ok").inc()
            self.metrics.policy_swap_duration.labels(name).observe(seconds)
            if old and old != version:  # a new adapter view served nothing before
                self.metrics.engine_ready.remove(name, old)
        self.metrics.engine_ready.labels(name, version).set(1)
        return seconds

    async def close(self, timeout_s: float = 5.0) -> bool:
        """Shut every engine down within about ``timeout_s``: each running engine is asked to stop
        (for most of that time); then every engine process left is killed: one that did not stop
        in time, and those of an engine still starting (the canary slot warming up), whose start
        is not waited for. Call ``kill_engine_processes`` once more at exit for a start that
        outlived this. Returns whether an engine start was abandoned (its thread still runs)."""
        deadline = time.monotonic() + timeout_s
        self._cancel_waiting_warm_up()
        engines = [self.adapters] if self.adapters is not None else list(self._slots.values())  # each once
        stops = [asyncio.ensure_future(in_daemon_thread(engine.shutdown)) for engine in engines]
        if stops:  # vLLM gives its workers 5 s to exit before it kills them: we give them less
            await asyncio.wait(stops, timeout=max(0.5, min(STOP_GRACE_S, deadline - time.monotonic() - 1.0)))
        starting = self._warming is not None and not self._warming.done()
        killed = kill_engine_processes()
        if killed:
            log.warning("killed %d engine process(es) that had not stopped%s", killed, " or were starting" * starting)
        if starting and self._warming is not None:  # its processes are gone: its start fails soon, or never ends
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._warming), timeout=min(1.0, deadline - time.monotonic()))
        warming = self._warming
        if warming is not None and warming.done() and not warming.cancelled() and warming.exception() is None:
            warming.result().shutdown()  # up after all: its processes are gone already
        return warming is not None and not warming.done()


STOP_GRACE_S = 2.0  # how long running engines may take to stop at shutdown before they are killed


def kill_engine_processes() -> int:
    """SIGKILL this process's engine processes: vLLM's EngineCore processes it started itself (its
    direct children) and their workers; how many. An engine started by another process below this
    one (the trainer's rollout engine, or a server a test runs) is that process's to stop."""
    import psutil

    killed = 0
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "VLLM" in child.name():
                for process in [*child.children(recursive=True), child]:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                        killed += 1
    return killed
