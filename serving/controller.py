"""The rollout controller: takes up newly published versions as canaries, judges them on what
users say, and carries out the admin's actions. It owns the rollout state (``heed.rollout``):
every change is a ``Decision`` saved durably before it takes effect in the router.

Rule (stated, so that people and outside tools can check it): thumbs on each version since the
canary started give Beta(1 + up, 1 + down) posteriors of its thumbs-up rate. Once the current
step has gathered ``min_feedback_per_step`` thumbs on the canary, the canary advances to the
next step when P(canary rate > stable rate) >= ``advance_probability`` and is rolled back when
P(canary rate < stable rate) >= ``rollback_probability``; otherwise it holds, until the step has
``max_feedback_per_step`` thumbs on the canary (or ``min_feedback_per_step``, if more) or has waited
``max_canary_hours``: then it is rolled back, undecided, and stable stays. A resume starts the step
again (its thumbs and its time). It is rolled back at once when its server-error rate
exceeds ``max_error_rate`` (after ``min_requests`` requests).
Advancing past the last step below 100% promotes it: the stable slot takes its weights.

The thumbs are evidence no single caller can flood (``capped_thumbs``): a caller (an API
principal and the end user it named) has one vote per (completion, choice), its latest, and no
caller carries more than ``max_caller_share`` of a version's thumbs: a caller with more is
weighed down to that share of the capped total. With a share of 0.25, fewer than five callers
cannot move a canary on thumbs at all.

Several replicas (a PostgreSQL event log) share one rollout state: exactly one replica's
controller decides at a time (``leads``: an advisory lock in the database), every replica
follows the state (``follow``) and loads what it names into its own slots, and an admin may act
through any replica. Every write names the revision it read (``StaleRollout`` if another came
first), so no decision overwrites one it has not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from heed.callers import capped_total
from heed.eventlog import CallerThumbs, EventStore
from heed.registry import PolicyMode, PolicyRegistry, RegistryError
from heed.rollout import (
    AdminAction,
    DecisionAction,
    RolloutRule,
    RolloutState,
    RolloutStatus,
    RolloutStore,
    StaleRollout,
    decision,
)
from serving.errors import Conflict, InvalidRequest, Unavailable
from serving.metrics import ServiceMetrics
from serving.router import Router
from serving.slots import SlotName, Slots

log = logging.getLogger(__name__)
ACT_WAIT_S = 60.0  # how long an admin's action waits for a slot load under way


@dataclass(frozen=True)
class Thumbs:
    """A version's thumbs as evidence: the capped (possibly fractional) counts, and what they came from."""

    thumbs_up: float = 0.0
    thumbs_down: float = 0.0
    votes: int = 0  # one per (caller, completion, choice), before the cap
    callers: int = 0

    @property
    def thumbs(self) -> float:
        return self.thumbs_up + self.thumbs_down


def capped_thumbs(votes: list[CallerThumbs], max_share: float) -> Thumbs:
    """One version's thumbs with no caller above ``max_share`` of the total that counts.

    The total T is ``capped_total`` of the callers' votes: callers under the cap count whole, the
    others count max_share * T each, their ups and downs scaled alike. One caller alone (or fewer
    than 1 / max_share) gives T = 0."""
    counts = [(v.up + v.down, v) for v in votes if v.up + v.down]
    raw = sum(n for n, _ in counts)
    total = capped_total((n for n, _ in counts), max_share)
    cap = max_share * total
    up = down = 0.0
    for n, v in counts:
        weight = min(1.0, cap / n) if max_share < 1 else 1.0
        up, down = up + v.up * weight, down + v.down * weight
    return Thumbs(up, down, raw, len(counts))


def probability_better(canary: Thumbs, stable: Thumbs, samples: int = 40_000) -> float:
    """P(canary's thumbs-up rate > stable's) under independent Beta(1 + up, 1 + down) posteriors
    (Monte Carlo with a fixed seed: the same evidence always gives the same answer)."""
    rng = np.random.default_rng(0)
    c = rng.beta(1 + canary.thumbs_up, 1 + canary.thumbs_down, samples)
    s = rng.beta(1 + stable.thumbs_up, 1 + stable.thumbs_down, samples)
    return float((c > s).mean())


def initial_state(state: RolloutState, version: str, sequence: int, mode: PolicyMode = "full") -> RolloutState:
    """The state of a service's first start: its base model is stable, served in ``mode``."""
    d = decision("initialised", version, "server", "the served base model", 0.0)
    return state.with_decision(
        d, stable=version, considered_sequence=max(state.considered_sequence, sequence), mode=mode
    )


def _always() -> bool:
    return True


# The controller's rules (a decision's evidence ``rule``, a label of heed_rollout_decisions_total)
# and the decisions each takes.
RULE_DECISIONS: tuple[tuple[DecisionAction, str], ...] = (
    ("rolled_back", "error_rate"),
    ("rolled_back", "p_worse"),
    ("advanced", "p_better"),
    ("promoted", "p_better"),
    ("rolled_back", "feedback_limit"),
    ("rolled_back", "time_limit"),
)


@dataclass
class RolloutController:
    rollouts: RolloutStore
    registry: PolicyRegistry
    store: EventStore
    slots: Slots
    router: Router
    metrics: ServiceMetrics
    rule: RolloutRule
    auto_canary: bool = True
    leads: Callable[[], bool] = _always  # whether this replica decides (blocking: called in a thread)
    state: RolloutState = field(default_factory=RolloutState)
    revision: int = 0  # the rollout state's revision that ``state`` is
    leader: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # (slot, version) that failed to load -> (when to try again, the delay before that)
    _retry_at: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every decision's series from the start, at 0: a counter's first increase is then seen
        # (Prometheus's increase() does not count a series' first sample).
        for action in get_args(DecisionAction):
            self.metrics.rollout_decisions.labels(action, "")
        for action, rule in RULE_DECISIONS:
            self.metrics.rollout_decisions.labels(action, rule)

    # ---- state ---------------------------------------------------------------------------
    def load(self) -> RolloutState:
        self.state, self.revision = self.rollouts.load()
        self.router.follow(self.state)
        self._publish_metrics()
        return self.state

    async def _save(self, state: RolloutState) -> None:
        """Write ``state`` over the revision this replica last saw, then act on it. Conflict if
        another replica changed the rollout in the meantime (this replica then follows it);
        Unavailable if the state cannot be written (its database unreachable)."""
        try:  # durable first: a decision the router acts on survives a crash
            self.revision = await asyncio.to_thread(self.rollouts.save, state, self.revision)
        except StaleRollout:
            await self._refresh()
            raise Conflict(
                "the rollout changed meanwhile (another replica or admin acted first); look at it again",
                code="rollout_changed",
            ) from None
        except Exception as exc:
            raise Unavailable(
                f"the rollout state cannot be written ({type(exc).__name__}: {exc}); retry",
                code="rollout_state_unavailable",
            ) from exc
        self.state = state
        self.router.follow(state)
        last = state.history[-1] if state.history else None
        if last is not None:  # the log keeps every decision; the state only the latest (HISTORY_KEPT)
            self.metrics.rollout_decisions.labels(last.action, last.evidence.get("rule", "")).inc()
            log.info("rollout: %s %s by %s at %g%% (%s)", last.action, last.version, last.by, last.share, last.reason)
        self._publish_metrics()

    def _take(self, state: RolloutState, revision: int) -> None:
        """Follow a state that another replica (or admin) wrote."""
        if revision == self.revision:
            return
        self.state, self.revision = state, revision
        self._retry_at.clear()  # a new decision: every slot load is worth a try again
        self.router.follow(state)
        self._publish_metrics()
        last = state.history[-1] if state.history else None
        if last is not None:
            log.info(
                "rollout state revision %d: %s %s by %s (%s)", revision, last.action, last.version, last.by, last.reason
            )

    async def _refresh(self) -> None:
        """Take the latest state if another writer changed it (the caller holds the lock)."""
        try:
            if await asyncio.to_thread(self.rollouts.revision) != self.revision:
                self._take(*await asyncio.to_thread(self.rollouts.load))
        except Exception as exc:
            raise Unavailable(
                f"the rollout state cannot be read ({type(exc).__name__}: {exc}); retry",
                code="rollout_state_unavailable",
            ) from exc

    async def follow(self) -> None:
        """Take up what another replica decided: the latest state, and this replica's slots
        loaded with what it names (stable; the canary, or stable's weights in an idle canary slot).
        A load that fails is tried again later (30 s, doubling to 10 min; at once after a new
        decision); meanwhile ``heed_rollout_in_sync`` is 0, and the router sends no traffic to a
        canary slot that does not hold the canary."""
        async with self._lock:
            await self._refresh()
            s = self.state
            wanted: list[tuple[SlotName, str | None]] = [("stable", s.stable)]
            if s.canary or self.slots.canary is not None:
                wanted.append(("canary", s.canary or s.stable))
            in_sync = True
            for name, version in wanted:
                slot = self.slots.stable if name == "stable" else self.slots.canary
                if version is None or (slot is not None and slot.policy_version == version):
                    continue
                retry_at, delay = self._retry_at.get((name, version), (0.0, 0.0))
                if time.monotonic() < retry_at:
                    in_sync = False
                    continue
                try:
                    folder = await asyncio.to_thread(self._verified, version)
                    seconds = await self.slots.load(name, version, folder)
                    self._retry_at.pop((name, version), None)
                    log.info("the %s slot serves %s, as the rollout state says (%.1f s)", name, version, seconds)
                except Exception as exc:
                    in_sync = False
                    delay = min(600.0, max(30.0, delay * 2))
                    self._retry_at[(name, version)] = (time.monotonic() + delay, delay)
                    self.metrics.policy_load_failures.labels(name).inc()
                    log.error(
                        "the %s slot cannot load %s, which the rollout state names (trying again in %.0f s): %s",
                        name,
                        version,
                        delay,
                        exc,
                    )
            self.metrics.rollout_in_sync.set(int(in_sync))

    def _verified(self, version: str) -> Path:
        """The version's checked folder, if this server can serve it (blocking: call it in a thread)."""
        return self.registry.verify_for(version, "adapter" if self.slots.adapters is not None else "full")

    def _publish_metrics(self) -> None:
        s = self.state
        served = s.in_use()
        if served:  # the versions the rollout no longer serves take their series with them
            self.metrics.retire_versions(served)
        self.metrics.canary_share.set(s.canary_share / 100 if s.canary else 0.0)
        self.metrics.rollout_step.set(s.step if s.canary else 0)
        self.metrics.rollout_paused.set(int(s.paused))
        self.metrics.policy_traffic.clear()
        if s.stable:
            self.metrics.policy_traffic.labels(s.stable).set(1 - (s.canary_share / 100 if s.canary else 0))
        if s.canary:
            self.metrics.policy_traffic.labels(s.canary).set(s.canary_share / 100)

    def status(self) -> RolloutStatus:
        return RolloutStatus(self.state, self.slots.status(), self.evidence, self.rule.to_json())

    # ---- the loop ------------------------------------------------------------------------
    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Every ``interval_s``: follow the state; if this replica leads, take up newly published
        versions and judge the canary (otherwise gather the same evidence, to show it)."""
        while not stop.is_set():
            try:
                await self.step()
            except Conflict as exc:
                log.info("rollout controller: %s", exc.message)
            except Exception:
                log.exception("rollout controller step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def step(self) -> None:
        """One look: follow the state, then lead (take up, judge and decide) or only gather evidence."""
        await self.follow()
        leader = await asyncio.to_thread(self.leads)
        if leader != self.leader:
            self.leader = leader
            self.metrics.rollout_leader.set(int(leader))
            log.info("this replica %s the rollout", "now decides" if leader else "follows")
        if leader and self.auto_canary:
            await self.take_up_new_version()
        await self.judge(decide=leader)

    async def take_up_new_version(self) -> None:
        latest = await asyncio.to_thread(self.registry.latest)
        if latest is None or latest.sequence <= self.state.considered_sequence or self.state.canary:
            return
        async with self._lock:
            await self._refresh()  # another replica may have decided since the look above
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
                await self._save(self.state.with_decision(d, considered_sequence=latest.sequence))
                log.warning("not canarying %s: %s", latest.version, d.reason)
                return
            reason = f"published {latest.version} (parent {latest.parent}, watermark {latest.watermark})"
            await self._start_canary(latest.version, "controller", reason)

    async def judge(self, decide: bool = True) -> None:
        """Gather the evidence (canary against stable) and, with ``decide``, act on it (``step``
        has just taken the latest state)."""
        async with self._lock:
            s = self.state
            if not s.canary or not s.stable or s.paused:
                return
            window = await asyncio.to_thread(self.store.thumb_votes, s.canary_since_seq)
            step = await asyncio.to_thread(self.store.thumb_votes, s.step_since_seq)
            share = self.rule.max_caller_share
            canary = capped_thumbs([v for v in window if v.policy_version == s.canary], share)
            stable = capped_thumbs([v for v in window if v.policy_version == s.stable], share)
            step_thumbs = capped_thumbs([v for v in step if v.policy_version == s.canary], share).thumbs
            traffic = self.router.traffic(s.canary)
            p_better = probability_better(canary, stable)
            self.metrics.canary_better_probability.set(p_better)
            for role, summary in (("stable", stable), ("canary", canary)):
                self.metrics.rollout_thumbs.labels(role, "up").set(summary.thumbs_up)
                self.metrics.rollout_thumbs.labels(role, "down").set(summary.thumbs_down)
            self.evidence = {
                "canary": {**_summary_json(canary), **traffic.to_json()},
                "stable": {**_summary_json(stable), **self.router.traffic(s.stable).to_json()},
                "canary_thumbs_this_step": round(step_thumbs, 2),
                "p_canary_better": round(p_better, 4),
                "p_canary_worse": round(1 - p_better, 4),
            }
            rule = self.rule
            if not decide:
                return
            enough = step_thumbs >= rule.min_feedback_per_step
            age_h = (time.time() - _step_started(s)) / 3600
            if traffic.requests >= rule.min_requests and traffic.error_rate > rule.max_error_rate:
                await self._rollback("controller", f"canary error rate above {rule.max_error_rate:.0%}", "error_rate")
            elif enough and 1 - p_better >= rule.rollback_probability:
                await self._rollback("controller", f"P(canary worse) = {1 - p_better:.3f}", "p_worse")
            elif enough and p_better >= rule.advance_probability:
                await self._advance("controller", f"P(canary better) = {p_better:.3f}", "p_better")
            elif enough and 0 < rule.max_feedback_per_step <= step_thumbs:  # so much evidence, still even: stable stays
                await self._rollback(
                    "controller",
                    f"undecided after {step_thumbs:.0f} thumbs at {s.canary_share:g}% (limit "
                    f"{rule.max_feedback_per_step}; P(canary better) = {p_better:.3f} on {canary.thumbs:.0f} thumbs "
                    f"from {canary.callers} callers)",
                    "feedback_limit",
                )
            elif 0 < rule.max_canary_hours < age_h:  # the wait for a decision has a limit: stable stays
                await self._rollback(
                    "controller",
                    f"undecided after {age_h:.1f} h at {s.canary_share:g}% (limit {rule.max_canary_hours:g} h; "
                    f"P(canary better) = {p_better:.3f} on {canary.thumbs:.0f} thumbs from {canary.callers} callers)",
                    "time_limit",
                )

    # ---- actions (the controller's and the admin's) --------------------------------------
    async def act(self, action: AdminAction, by: str, version: str | None = None) -> RolloutStatus:
        """An admin's action, for every surface (HTTP, gRPC, hence `heed rollout` and the web
        page); returns the status after it."""
        try:  # a slot load under way (a follow, another action) holds the lock: wait for it, not forever
            await asyncio.wait_for(self._lock.acquire(), timeout=ACT_WAIT_S)
        except TimeoutError:
            raise Unavailable(
                f"the rollout is busy (a version is loading) for more than {ACT_WAIT_S:.0f} s; retry",
                code="rollout_busy",
            ) from None
        try:
            return await self._act(action, by, version)
        finally:
            self._lock.release()

    async def _act(self, action: AdminAction, by: str, version: str | None) -> RolloutStatus:
        await self._refresh()  # act on the latest state, whichever replica wrote it
        if action == "canary":
            if not version:
                raise InvalidRequest('give the version to canary: {"version": "v2"}', param="version")
            if self.state.canary:
                raise Conflict(f"{self.state.canary} is already the canary; promote or roll it back first")
            if version == self.state.stable:
                raise InvalidRequest(f"{version} is already stable", param="version")
            await self._start_canary(version, by, "started by an admin", strict=True)
        elif action in ("promote", "rollback"):
            if not self.state.canary:
                raise Conflict("there is no canary to act on", code="no_canary")
            if action == "promote":
                await self._promote(by, "promoted by an admin")
            else:
                await self._rollback(by, "rolled back by an admin")
        else:
            did: DecisionAction = "paused" if action == "pause" else "resumed"
            d = decision(did, self.state.canary, by, f"{did} by {by}", self.state.canary_share)
            if action == "pause":
                await self._save(self.state.with_decision(d, paused=True))
            else:  # the step starts again: its thumbs (the router kept sending the canary its share) and its time
                seq = await asyncio.to_thread(self.store.last_seq)
                await self._save(self.state.with_decision(d, paused=False, step_since_seq=seq))
        return self.status()

    async def resume_canary(self) -> None:
        """After a restart: load the canary the state names, or end its rollout if it cannot load."""
        async with self._lock:
            s = self.state
            assert s.canary is not None
            try:
                folder = await asyncio.to_thread(self._verified, s.canary)
                await self.slots.load("canary", s.canary, folder)
                log.info("resumed the rollout of canary %s at %.0f%%", s.canary, s.canary_share)
            except Exception as exc:
                log.error("canary %s cannot be loaded after the restart: %s", s.canary, exc)
                self.metrics.policy_load_failures.labels("canary").inc()
                d = decision("refused", s.canary, "server", f"{type(exc).__name__}: {exc}", 0.0)
                await self._save(s.with_decision(d, canary=None, canary_share=0.0, step=0))

    async def _start_canary(self, version: str, by: str, reason: str, strict: bool = False) -> None:
        try:
            manifest = await asyncio.to_thread(self.registry.manifest, version)
            folder = await asyncio.to_thread(self._verified, version)
            seconds = await self.slots.load("canary", version, folder)
        except Exception as exc:
            sequence = self._sequence_of(version)
            log.error("refusing policy version %s: %s", version, exc)
            self.metrics.policy_load_failures.labels("canary").inc()
            d = decision("refused", version, by, f"{type(exc).__name__}: {exc}", self.state.canary_share)
            considered = max(self.state.considered_sequence, sequence)
            await self._save(self.state.with_decision(d, considered_sequence=considered))
            if strict:
                raise InvalidRequest(f"cannot load {version}: {exc}", param="version") from None
            return
        seq = await asyncio.to_thread(self.store.last_seq)
        self.router.reset_traffic()
        share = self.rule.steps[0]
        d = decision("canary_started", version, by, reason, share, load_seconds=round(seconds, 3))
        await self._save(
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

    async def _advance(self, by: str, reason: str, rule: str | None = None) -> None:
        s = self.state
        nxt = s.step + 1
        if nxt >= len(self.rule.steps) or self.rule.steps[nxt] >= 100:
            await self._promote(by, reason, rule)
            return
        seq = await asyncio.to_thread(self.store.last_seq)
        share = self.rule.steps[nxt]
        d = decision("advanced", s.canary, by, reason, share, **self.evidence, **_rule(rule))
        await self._save(s.with_decision(d, step=nxt, canary_share=share, step_since_seq=seq))
        log.info("canary %s advanced to %.0f%% (%s)", s.canary, share, reason)

    async def _promote(self, by: str, reason: str, rule: str | None = None) -> None:
        s = self.state
        assert s.canary is not None
        try:  # a canary whose files are gone or changed cannot be promoted: paused, not retried every step
            folder = await asyncio.to_thread(self._verified, s.canary)
            seconds = await self.slots.load("stable", s.canary, folder)
        except Exception as exc:
            log.exception("promoting %s failed; the rollout is paused", s.canary)
            d = decision("promote_failed", s.canary, by, f"{type(exc).__name__}: {exc}", s.canary_share)
            await self._save(s.with_decision(d, paused=True))
            raise Conflict(f"promoting {s.canary} failed: {exc}") from None
        d = decision(
            "promoted", s.canary, by, reason, 0.0, swap_seconds=round(seconds, 3), **self.evidence, **_rule(rule)
        )
        await self._save(s.with_decision(d, stable=s.canary, canary=None, canary_share=0.0, step=0))

    async def _rollback(self, by: str, reason: str, rule: str | None = None) -> None:
        s = self.state
        assert s.canary is not None and s.stable is not None
        d = decision("rolled_back", s.canary, by, reason, 0.0, **self.evidence, **_rule(rule))
        await self._save(s.with_decision(d, canary=None, canary_share=0.0, step=0))  # no new traffic from here on
        try:  # the canary slot returns to stable's weights
            folder = await asyncio.to_thread(self._verified, s.stable)
            await self.slots.load("canary", s.stable, folder)
        except Exception:
            log.exception("the canary slot could not return to %s; it takes no traffic", s.stable)


def _rule(rule: str | None) -> dict[str, str]:
    """The evidence's ``rule``: which of the controller's rules took a decision (none: an admin's)."""
    return {"rule": rule} if rule else {}


def _step_started(state: RolloutState) -> float:
    """When the current canary's step began to wait for a decision: its latest start, advance or
    resume (time paused, or spent on earlier steps, does not count); now if none is kept."""
    since = None
    for d in state.history:
        if d.action == "canary_started":
            since = d.time if d.version == state.canary else None
        elif since is not None and d.action in ("advanced", "resumed"):
            since = d.time
    return time.time() if since is None else since


def _summary_json(summary: Thumbs) -> dict[str, Any]:
    return {
        "thumbs_up": round(summary.thumbs_up, 2),
        "thumbs_down": round(summary.thumbs_down, 2),
        "thumbs_up_rate": summary.thumbs_up / summary.thumbs if summary.thumbs else None,
        "votes": summary.votes,
        "callers": summary.callers,
    }
