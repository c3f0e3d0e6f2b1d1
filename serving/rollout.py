"""The router and the rollout controller: which slot answers a request, and when a canary
advances, is promoted or is rolled back.

Router: a request for the service alias goes to the canary when the caller's sticky bucket
(a hash of the request's ``user``, else of the API key's principal, into 0..9999) falls under the
canary share; a caller stays on the same side while the share grows. A request may pin a served
version (``model`` = the version, or the ``X-Heed-Policy-Version`` header / metadata).

Rule (stated, so that people and outside tools can check it): thumbs on each version since the
canary started give Beta(1 + up, 1 + down) posteriors of its thumbs-up rate. Once the current
step has gathered ``min_feedback_per_step`` thumbs on the canary, the canary advances to the
next step when P(canary rate > stable rate) >= ``advance_probability`` and is rolled back when
P(canary rate < stable rate) >= ``rollback_probability``; otherwise it holds. It is rolled back at
once when its server-error rate exceeds ``max_error_rate`` (after ``min_requests`` requests).
Advancing past the last step below 100% promotes it: the stable slot takes its weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heed.datadir import DataDir
from heed.eventlog import EventStore, FeedbackSummary
from heed.registry import PolicyRegistry, RegistryError
from heed.rollout import RolloutState, decision, load_state, save_state
from serving.engine import EngineSettings, EngineSlot
from serving.errors import Conflict, InvalidRequest, NotFound
from serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutRule:
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    min_feedback_per_step: int = 50
    advance_probability: float = 0.95
    rollback_probability: float = 0.95
    max_error_rate: float = 0.05
    min_requests: int = 20


def sticky_bucket(key: str) -> int:
    """The caller's place in 0..9999: the same for the same caller, on every replica."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000


def probability_better(canary: FeedbackSummary, stable: FeedbackSummary, samples: int = 40_000) -> float:
    """P(canary's thumbs-up rate > stable's) under independent Beta(1 + up, 1 + down) posteriors
    (Monte Carlo with a fixed seed: the same evidence always gives the same answer)."""
    rng = np.random.default_rng(0)
    c = rng.beta(1 + canary.thumbs_up, 1 + canary.thumbs_down, samples)
    s = rng.beta(1 + stable.thumbs_up, 1 + stable.thumbs_down, samples)
    return float((c > s).mean())


@dataclass
class Traffic:
    """Requests, server errors and latency per version since the canary started (in memory)."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "latency_mean_s": self.latency_sum / self.requests if self.requests else None,
        }


@dataclass
class RolloutController:
    data_dir: Path
    registry: PolicyRegistry
    store: EventStore
    slots: dict[str, EngineSlot]  # shared with the completion service: "stable", later "canary"
    metrics: ServiceMetrics
    rule: RolloutRule
    engine_settings: EngineSettings
    auto_canary: bool = True
    state: RolloutState = field(default_factory=RolloutState)
    evidence: dict[str, Any] = field(default_factory=dict)
    _traffic: dict[str, Traffic] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _warming: asyncio.Task[EngineSlot] | None = None

    # ---- routing -------------------------------------------------------------------------
    def route(self, caller: str, pinned: str | None = None) -> EngineSlot:
        if pinned:
            return self.slot_for_version(pinned)
        canary = self.slots.get("canary")
        share = self.state.canary_share
        routable = self.state.canary and canary is not None and canary.ready and share > 0
        if routable and sticky_bucket(caller) < share * 100:
            assert canary is not None
            return canary
        return self.slots["stable"]

    def slot_for_version(self, version: str) -> EngineSlot:
        for name in ("stable", "canary"):
            slot = self.slots.get(name)
            if slot is not None and slot.policy_version == version and slot.engine is not None:
                return slot
        served = ", ".join(self.served_versions())
        raise NotFound(f"The model '{version}' does not exist; served: {served}", param="model", code="model_not_found")

    def served_versions(self) -> list[str]:
        versions: list[str] = []
        for name in ("stable", "canary"):
            slot = self.slots.get(name)
            if slot is not None and slot.engine is not None and slot.policy_version not in versions:
                versions.append(slot.policy_version)
        return versions

    def observe(self, version: str, latency_s: float, error: bool) -> None:
        traffic = self._traffic.setdefault(version, Traffic())
        traffic.requests += 1
        traffic.errors += int(error)
        traffic.latency_sum += latency_s

    # ---- state ---------------------------------------------------------------------------
    def load(self) -> RolloutState:
        self.state = load_state(self.data_dir)
        self._publish_metrics()
        return self.state

    def _save(self, state: RolloutState) -> None:
        save_state(self.data_dir, state)
        self.state = state
        last = state.history[-1] if state.history else None
        if last is not None:
            self.metrics.rollout_decisions.labels(last.action).inc()
        self._publish_metrics()

    def _publish_metrics(self) -> None:
        s = self.state
        self.metrics.canary_share.set(s.canary_share / 100 if s.canary else 0.0)
        self.metrics.rollout_step.set(s.step if s.canary else 0)
        self.metrics.rollout_paused.set(int(s.paused))
        self.metrics.policy_traffic.clear()
        if s.stable:
            self.metrics.policy_traffic.labels(s.stable).set(1 - (s.canary_share / 100 if s.canary else 0))
        if s.canary:
            self.metrics.policy_traffic.labels(s.canary).set(s.canary_share / 100)

    def status(self) -> dict[str, Any]:
        slots = {
            name: {"policy_version": slot.policy_version, "ready": slot.ready, "swapping": slot.swapping}
            for name, slot in self.slots.items()
        }
        return {
            "object": "rollout",
            **self.state.to_json(),
            "slots": slots,
            "evidence": self.evidence,
            "rule": {
                "steps": list(self.rule.steps),
                "min_feedback_per_step": self.rule.min_feedback_per_step,
                "advance_probability": self.rule.advance_probability,
                "rollback_probability": self.rule.rollback_probability,
                "max_error_rate": self.rule.max_error_rate,
            },
        }

    # ---- the loop ------------------------------------------------------------------------
    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Take up newly published versions and judge the canary, every ``interval_s``."""
        while not stop.is_set():
            try:
                if self.auto_canary:
                    await self.take_up_new_version()
                await self.judge()
            except Exception:
                log.exception("rollout controller step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def take_up_new_version(self) -> None:
        latest = await asyncio.to_thread(self.registry.latest)
        if latest is None or latest.sequence <= self.state.considered_sequence or self.state.canary:
            return
        async with self._lock:
            if self.state.canary or latest.sequence <= self.state.considered_sequence:
                return
            if latest.parent != self.state.stable:  # trained from a policy that is no longer stable
                d = decision(
                    "refused",
                    latest.version,
                    "controller",
                    f"trained from {latest.parent}, but {self.state.stable} is stable now",
                    0.0,
                )
                self._save(self.state.with_decision(d, considered_sequence=latest.sequence))
                log.warning("not canarying %s: %s", latest.version, d.reason)
                return
            reason = f"published {latest.version} (parent {latest.parent}, watermark {latest.watermark})"
            await self._start_canary(latest.version, "controller", reason)

    async def judge(self) -> None:
        async with self._lock:
            s = self.state
            if not s.canary or not s.stable or s.paused:
                return
            window = await asyncio.to_thread(self.store.feedback_summary, s.canary_since_seq)
            step = await asyncio.to_thread(self.store.feedback_summary, s.step_since_seq)
            canary, stable = window.get(s.canary, FeedbackSummary()), window.get(s.stable, FeedbackSummary())
            step_thumbs = step.get(s.canary, FeedbackSummary()).thumbs
            traffic = self._traffic.get(s.canary, Traffic())
            p_better = probability_better(canary, stable)
            self.metrics.canary_better_probability.set(p_better)
            for role, summary in (("stable", stable), ("canary", canary)):
                self.metrics.rollout_thumbs.labels(role, "up").set(summary.thumbs_up)
                self.metrics.rollout_thumbs.labels(role, "down").set(summary.thumbs_down)
            self.evidence = {
                "canary": {**_summary_json(canary), **traffic.to_json()},
                "stable": {**_summary_json(stable), **self._traffic.get(s.stable, Traffic()).to_json()},
                "canary_thumbs_this_step": step_thumbs,
                "p_canary_better": round(p_better, 4),
                "p_canary_worse": round(1 - p_better, 4),
            }
            rule = self.rule
            if traffic.requests >= rule.min_requests and traffic.errors / traffic.requests > rule.max_error_rate:
                await self._rollback("controller", f"canary error rate above {rule.max_error_rate:.0%}")
            elif step_thumbs < rule.min_feedback_per_step:
                return
            elif 1 - p_better >= rule.rollback_probability:
                await self._rollback("controller", f"P(canary worse) = {1 - p_better:.3f}")
            elif p_better >= rule.advance_probability:
                await self._advance("controller", f"P(canary better) = {p_better:.3f}")

    # ---- actions (the controller's and the admin's) --------------------------------------
    async def start_canary(self, version: str, by: str) -> dict[str, Any]:
        async with self._lock:
            if self.state.canary:
                raise Conflict(f"{self.state.canary} is already the canary; promote or roll it back first")
            if version == self.state.stable:
                raise InvalidRequest(f"{version} is already stable", param="version")
            await self._start_canary(version, by, "started by an admin", strict=True)
            return self.status()

    async def promote(self, by: str) -> dict[str, Any]:
        async with self._lock:
            self._need_canary()
            await self._promote(by, "promoted by an admin")
            return self.status()

    async def rollback(self, by: str) -> dict[str, Any]:
        async with self._lock:
            self._need_canary()
            await self._rollback(by, "rolled back by an admin")
            return self.status()

    async def set_paused(self, paused: bool, by: str) -> dict[str, Any]:
        async with self._lock:
            action = "paused" if paused else "resumed"
            d = decision(action, self.state.canary, by, f"{action} by {by}", self.state.canary_share)
            self._save(self.state.with_decision(d, paused=paused))
            return self.status()

    async def resume_canary(self) -> None:
        """After a restart: load the canary the state names, or end its rollout if it cannot load."""
        async with self._lock:
            s = self.state
            assert s.canary is not None
            try:
                folder = await asyncio.to_thread(self.registry.verify, s.canary)
                await self._load("canary", s.canary, folder)
                log.info("resumed the rollout of canary %s at %.0f%%", s.canary, s.canary_share)
            except Exception as exc:
                log.error("canary %s cannot be loaded after the restart: %s", s.canary, exc)
                self.metrics.policy_load_failures.labels("canary").inc()
                d = decision("refused", s.canary, "server", f"{type(exc).__name__}: {exc}", 0.0)
                self._save(s.with_decision(d, canary=None, canary_share=0.0, step=0))

    def _need_canary(self) -> None:
        if not self.state.canary:
            raise Conflict("there is no canary to act on", code="no_canary")

    async def _start_canary(self, version: str, by: str, reason: str, strict: bool = False) -> None:
        try:
            manifest = await asyncio.to_thread(self.registry.manifest, version)
            folder = await asyncio.to_thread(self.registry.verify, version)
            seconds = await self._load("canary", version, folder)
        except Exception as exc:
            sequence = self._sequence_of(version)
            log.error("refusing policy version %s: %s", version, exc)
            self.metrics.policy_load_failures.labels("canary").inc()
            d = decision("refused", version, by, f"{type(exc).__name__}: {exc}", self.state.canary_share)
            considered = max(self.state.considered_sequence, sequence)
            self._save(self.state.with_decision(d, considered_sequence=considered))
            if strict:
                raise InvalidRequest(f"cannot load {version}: {exc}", param="version") from None
            return
        seq = await asyncio.to_thread(self.store.last_seq)
        self._traffic.clear()
        share = self.rule.steps[0]
        d = decision("canary_started", version, by, reason, share, load_seconds=round(seconds, 3))
        self._save(
            self.state.with_decision(
                d,
                canary=version,
                canary_share=share,
                step=0,
                paused=False,
                canary_since_seq=seq,
                step_since_seq=seq,
                considered_sequence=max(self.state.considered_sequence, manifest.sequence),
            )
        )
        log.info("canary %s at %.0f%% of traffic (%s)", version, share, reason)

    def _sequence_of(self, version: str) -> int:
        try:
            return self.registry.manifest(version).sequence
        except RegistryError:
            return 0

    def warm_canary_slot(self) -> None:
        """Start the canary slot's engine on the stable version, in the background, so that a new
        version goes live by a swap (about a second) instead of an engine start (tens of seconds)."""
        stable = self.slots["stable"]
        if "canary" in self.slots or self._warming is not None or not isinstance(stable.model, Path):
            return
        weights = DataDir(self.data_dir).engine_weights("canary")
        slot = EngineSlot("canary", stable.model, stable.policy_version, self.engine_settings, weights)

        async def warm() -> EngineSlot:
            await asyncio.to_thread(slot.start)
            self.slots.setdefault("canary", slot)
            self.metrics.engine_ready.labels("canary", slot.policy_version).set(1)
            log.info("the canary slot is warm (on %s)", slot.policy_version)
            return slot

        self._warming = asyncio.get_running_loop().create_task(warm())

    async def close(self) -> None:
        """Shut every engine down (a canary slot still warming up too, once it is up)."""
        if self._warming is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._warming, timeout=300)
        for slot in list(self.slots.values()):
            slot.shutdown()

    async def _load(self, slot_name: str, version: str, folder: Path) -> float:
        """Put ``version`` into the slot: a swap in place, or the slot's first engine."""
        started = time.monotonic()
        if slot_name == "canary" and self._warming is not None:
            try:
                await self._warming  # a warm-up under way: swap into it once it is up
            except Exception:
                log.exception("warming up the canary slot failed; starting it on %s instead", version)
            self._warming = None
        slot = self.slots.get(slot_name)
        if slot is None or slot.engine is None:
            weights = DataDir(self.data_dir).engine_weights(slot_name)
            slot = EngineSlot(slot_name, folder, version, self.engine_settings, weights)
            await asyncio.to_thread(slot.start)
            self.slots[slot_name] = slot
            seconds = time.monotonic() - started
        else:
            old = slot.policy_version
            try:
                seconds = await slot.swap(version, folder)
            except Exception:
                self.metrics.policy_swaps.labels(slot_name, "failed").inc()
                raise
            self.metrics.policy_swaps.labels(slot_name, "ok").inc()
            self.metrics.policy_swap_duration.labels(slot_name).observe(seconds)
            if old != version:
                self.metrics.engine_ready.remove(slot_name, old)
        self.metrics.engine_ready.labels(slot_name, version).set(1)
        return seconds

    async def _advance(self, by: str, reason: str) -> None:
        s = self.state
        nxt = s.step + 1
        if nxt >= len(self.rule.steps) or self.rule.steps[nxt] >= 100:
            await self._promote(by, reason)
            return
        seq = await asyncio.to_thread(self.store.last_seq)
        share = self.rule.steps[nxt]
        d = decision("advanced", s.canary, by, reason, share, **self.evidence)
        self._save(s.with_decision(d, step=nxt, canary_share=share, step_since_seq=seq))
        log.info("canary %s advanced to %.0f%% (%s)", s.canary, share, reason)

    async def _promote(self, by: str, reason: str) -> None:
        s = self.state
        assert s.canary is not None
        folder = await asyncio.to_thread(self.registry.verify, s.canary)
        try:
            seconds = await self._load("stable", s.canary, folder)
        except Exception as exc:
            log.exception("promoting %s failed; the rollout is paused", s.canary)
            d = decision("promote_failed", s.canary, by, f"{type(exc).__name__}: {exc}", s.canary_share)
            self._save(s.with_decision(d, paused=True))
            raise Conflict(f"promoting {s.canary} failed: {exc}") from None
        d = decision("promoted", s.canary, by, reason, 0.0, swap_seconds=round(seconds, 3), **self.evidence)
        self._save(s.with_decision(d, stable=s.canary, canary=None, canary_share=0.0, step=0))
        log.info("promoted %s to stable (%s)", s.canary, reason)

    async def _rollback(self, by: str, reason: str) -> None:
        s = self.state
        assert s.canary is not None and s.stable is not None
        d = decision("rolled_back", s.canary, by, reason, 0.0, **self.evidence)
        self._save(s.with_decision(d, canary=None, canary_share=0.0, step=0))  # no new traffic from here on
        log.info("rolled back %s (%s)", s.canary, reason)
        try:  # the canary slot returns to stable's weights
            folder = await asyncio.to_thread(self.registry.verify, s.stable)
            await self._load("canary", s.stable, folder)
        except Exception:
            log.exception("the canary slot could not return to %s; it takes no traffic", s.stable)


def _summary_json(summary: FeedbackSummary) -> dict[str, Any]:
    return {
        "thumbs_up": summary.thumbs_up,
        "thumbs_down": summary.thumbs_down,
        "thumbs_up_rate": summary.thumbs_up / summary.thumbs if summary.thumbs else None,
        "ratings": summary.ratings,
        "rating_mean": summary.rating_mean,
    }


def initial_state(state: RolloutState, version: str, sequence: int) -> RolloutState:
    """The state of a service's first start: its base model is stable."""
    d = decision("initialised", version, "server", "the served base model", 0.0)
    return state.with_decision(d, stable=version, considered_sequence=max(state.considered_sequence, sequence))
