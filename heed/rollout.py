"""Rollout state: which policy version is stable, which is canary at what share, and every
decision taken with its evidence. The server owns and writes it; the trainer reads ``stable``
(the policy the next round starts from). Both import it from here.

Also the rollout's public shapes: the ``RolloutRule`` the controller follows and the
``RolloutStatus`` that the HTTP and gRPC admin APIs, ``heed rollout status`` and the web page
all render (``to_json``/``from_json`` are the one JSON form of it).

Where it is stored (``open_rollout_store``): with the SQLite event log, in one JSON file
(``DataDir.rollout_state``) replaced by ``heed.datadir.atomic_write_json`` on every change; with
the PostgreSQL event log, in that database (``heed.eventlog.postgres.SharedDocument``), which every
replica follows. Either way a write names the revision it read and fails with ``StaleRollout``
when another writer came first (compare-and-set): no decision overwrites one it has not seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from heed.datadir import DataDir, atomic_write_json
from heed.registry import PolicyMode

log = logging.getLogger(__name__)

DecisionAction = Literal[
    "initialised",
    "canary_started",
    "advanced",
    "promoted",
    "promote_failed",
    "rolled_back",
    "refused",
    "paused",
    "resumed",
]
# A request pins a served version with this HTTP header (or, lower-cased, gRPC metadata key).
PIN_HEADER = "X-Heed-Policy-Version"

# What an admin may ask of a rollout (HTTP /admin/rollout/ACTION, gRPC heed.v1.Rollout, `heed rollout ACTION`).
AdminAction = Literal["canary", "promote", "rollback", "pause", "resume"]
ADMIN_ACTIONS: tuple[AdminAction, ...] = get_args(AdminAction)


@dataclass(frozen=True)
class Decision:
    """One change of the rollout, why it was taken, and on what evidence."""

    time: float
    action: DecisionAction
    version: str | None
    by: str  # "controller" or the admin principal
    reason: str
    share: float = 0.0  # the canary share after the decision, in percent
    evidence: dict[str, Any] = field(default_factory=dict)


# Decisions a rollout state keeps: about 50 rounds' worth (a canary started, advanced, promoted).
HISTORY_KEPT = 200


@dataclass(frozen=True)
class RolloutState:
    stable: str | None = None
    canary: str | None = None
    canary_share: float = 0.0  # percent of routed traffic that goes to the canary
    step: int = 0  # index into the controller's steps
    paused: bool = False
    canary_since_seq: int = 0  # event-log position when the canary started
    step_since_seq: int = 0  # event-log position when the current step started
    considered_sequence: int = 0  # registry versions up to this sequence were taken up or refused
    history: tuple[Decision, ...] = ()
    # How the server serves versions, so the trainer makes what it can serve: "full" (whole models,
    # an engine per slot) or "adapter" (LoRA adapters on one base, in one engine).
    mode: PolicyMode = "full"

    def in_use(self) -> set[str]:
        """The versions a server serves or may go back to: stable, the canary, and the stable
        before the last promotion (adapter mode keeps it resident)."""
        stable = previous = None
        for d in self.history:
            if d.action in ("initialised", "promoted") and d.version and d.version != stable:
                previous, stable = stable, d.version
        return {v for v in (self.stable, self.canary, previous) if v}

    def with_decision(self, decision: Decision, **changes: Any) -> RolloutState:
        """The state after ``decision``: the history keeps the latest ``HISTORY_KEPT`` decisions (the
        state is read on every poll and sent whole by the status APIs; server logs keep them all),
        and of older ones the last two that set stable and the last canary start, which say what
        ``in_use`` and the canary's time limit need."""
        history = (*self.history, decision)
        if len(history) > HISTORY_KEPT:
            older = history[:-HISTORY_KEPT]
            moves = [d for d in older if d.action in ("initialised", "promoted")][-2:]
            starts = [d for d in older if d.action == "canary_started"][-1:]
            history = (*sorted((*moves, *starts), key=older.index), *history[-HISTORY_KEPT:])
        return replace(self, history=history, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = [asdict(d) for d in self.history]
        if self.mode == "full":  # as heed wrote it before modes: an older replica reads it
            data.pop("mode")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}  # a newer heed's: ignored
        data["history"] = tuple(Decision(**d) for d in data.get("history", ()))
        return cls(**data)


def decision(
    action: DecisionAction, version: str | None, by: str, reason: str, share: float, **evidence: Any
) -> Decision:
    return Decision(time.time(), action, version, by, reason, share, evidence)


class StaleRollout(Exception):
    """A write of the rollout state named a revision that another writer has replaced."""


class Document(Protocol):
    """Where the state's JSON lives: ``JsonFile`` or ``heed.eventlog.postgres.SharedDocument``."""

    def revision(self) -> int: ...
    def read(self) -> tuple[dict[str, Any] | None, int]: ...
    def write(self, body: dict[str, Any], expected: int) -> int | None: ...
    def close(self) -> None: ...


class JsonFile:
    """The state in one JSON file of one machine (its revision inside), for the SQLite log's
    single server: compare-and-set under a lock file beside it (``.NAME.lock``, flock), so
    between the threads and processes of that machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # flock is per open file: the threads of one process take turns first

    def read(self) -> tuple[dict[str, Any] | None, int]:
        if not self.path.exists():
            return None, 0
        body = json.loads(self.path.read_text())
        return body, int(body.pop("revision", 0))

    def revision(self) -> int:
        return self.read()[1]

    def write(self, body: dict[str, Any], expected: int) -> int | None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for one read and one small write
            if self.revision() != expected:
                return None
            atomic_write_json(self.path, {"revision": expected + 1, **body})
            return expected + 1

    def close(self) -> None:
        pass


@dataclass
class RolloutStore:
    """The rollout state, read and written by revision."""

    document: Document

    def load(self) -> tuple[RolloutState, int]:
        body, revision = self.document.read()
        return (RolloutState.from_json(body) if body else RolloutState()), revision

    def revision(self) -> int:
        return self.document.revision()

    def save(self, state: RolloutState, expected: int) -> int:
        """Write ``state`` over revision ``expected``; its new revision. StaleRollout if another
        writer replaced that revision first."""
        revision = self.document.write(state.to_json(), expected)
        if revision is None:
            raise StaleRollout(f"the rollout state changed (revision {expected} is not the latest)")
        return revision

    def close(self) -> None:
        self.document.close()


def open_rollout_store(event_log: str, data_dir: Path) -> RolloutStore:
    """The rollout state beside the event log ``event_log`` (a resolved ``log_location``): in the
    same PostgreSQL database, or in the data directory's file."""
    from heed.eventlog import is_database_url

    path = DataDir(data_dir).rollout_state
    if is_database_url(event_log):
        from heed.eventlog.postgres import SharedDocument

        document = SharedDocument(event_log, "rollout")
        # A service that kept the state in its data directory before (heed before the shared
        # state): the database starts from that file, not from nothing.
        if path.exists():
            if document.revision() == 0:
                body, _ = JsonFile(path).read()
                if body and document.write(body, 0) is not None:
                    log.warning("the rollout state now lives in the event log's database; copied %s there", path)
            # The file is out of date from now on: out of the way of a command that would read it
            # for the rollout state (`heed registry prune` without --event-log).
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + ".moved-to-database"))
        return RolloutStore(document)
    return RolloutStore(JsonFile(path))


def read_state(event_log: str, data_dir: Path) -> RolloutState:
    """The rollout state as it is now, for a command that only looks at it."""
    store = open_rollout_store(event_log, data_dir)
    try:
        return store.load()[0]
    finally:
        store.close()


def load_state(data_dir: Path) -> RolloutState:
    """The state in the data directory's file (the SQLite layout)."""
    return RolloutStore(JsonFile(DataDir(data_dir).rollout_state)).load()[0]


def save_state(data_dir: Path, state: RolloutState) -> None:
    """Replace the state in the data directory's file, whatever its revision (tests, tools)."""
    store = RolloutStore(JsonFile(DataDir(data_dir).rollout_state))
    store.save(state, store.revision())


# ---- the rule and the status ---------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutRule:
    """When a canary advances, is promoted or is rolled back (serving.controller applies it)."""

    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)  # canary shares in percent; reaching 100 promotes
    min_feedback_per_step: int = 50
    advance_probability: float = 0.95
    rollback_probability: float = 0.95
    max_error_rate: float = 0.05
    min_requests: int = 20
    max_caller_share: float = 0.25  # no caller carries more of a version's thumbs (serving.controller)
    max_canary_hours: float = 24.0  # a canary step still undecided after this long is rolled back (0: never)
    max_feedback_per_step: int = 2000  # ... or after this many thumbs on the canary (0: no cap)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "min_feedback_per_step": self.min_feedback_per_step,
            "advance_probability": self.advance_probability,
            "rollback_probability": self.rollback_probability,
            "max_error_rate": self.max_error_rate,
            "max_caller_share": self.max_caller_share,
            "max_canary_hours": self.max_canary_hours,
            "max_feedback_per_step": self.max_feedback_per_step,
        }


@dataclass(frozen=True)
class SlotStatus:
    """One engine slot ("stable" or "canary"): the version it serves, and whether it can."""

    name: str
    policy_version: str
    ready: bool
    swapping: bool


@dataclass(frozen=True)
class RolloutStatus:
    """The rollout as every surface shows it: the state, the slots, the controller's latest
    evidence (canary against stable) and the rule it is judged by."""

    state: RolloutState
    slots: tuple[SlotStatus, ...]
    evidence: dict[str, Any]
    rule: dict[str, Any]  # RolloutRule.to_json()

    def slot(self, name: str) -> SlotStatus | None:
        return next((s for s in self.slots if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        slots = {
            s.name: {"policy_version": s.policy_version, "ready": s.ready, "swapping": s.swapping} for s in self.slots
        }
        return {
            "object": "rollout",
            **self.state.to_json(),
            "slots": slots,
            "evidence": self.evidence,
            "rule": self.rule,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutStatus:
        state_fields = set(RolloutState.__dataclass_fields__)
        state = RolloutState.from_json({k: v for k, v in data.items() if k in state_fields})
        slots = tuple(SlotStatus(name=name, **slot) for name, slot in data.get("slots", {}).items())
        return cls(state, slots, dict(data.get("evidence") or {}), dict(data.get("rule") or {}))
