"""Rollout state: which policy version is stable, which is canary at what share, and every
decision taken with its evidence. The server owns and writes it; the trainer reads ``stable``
(the policy the next round starts from). Both import it from here.

Stored as one JSON file (``DataDir.rollout_state``), replaced by ``heed.datadir.atomic_write_json``
on every change.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from heed.datadir import DataDir, atomic_write_json


@dataclass(frozen=True)
class Decision:
    """One change of the rollout, why it was taken, and on what evidence."""

    time: float
    action: str  # canary_started | advanced | promoted | rolled_back | refused | paused | resumed
    version: str | None
    by: str  # "controller" or the admin principal
    reason: str
    share: float = 0.0  # the canary share after the decision, in percent
    evidence: dict[str, Any] = field(default_factory=dict)


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

    def with_decision(self, decision: Decision, **changes: Any) -> RolloutState:
        return replace(self, history=(*self.history, decision), **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = [asdict(d) for d in self.history]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        data = dict(data)
        data["history"] = tuple(Decision(**d) for d in data.get("history", ()))
        return cls(**data)


def decision(action: str, version: str | None, by: str, reason: str, share: float, **evidence: Any) -> Decision:
    return Decision(time.time(), action, version, by, reason, share, evidence)


def load_state(data_dir: Path) -> RolloutState:
    path = DataDir(data_dir).rollout_state
    if not path.exists():
        return RolloutState()
    return RolloutState.from_json(json.loads(path.read_text()))


def save_state(data_dir: Path, state: RolloutState) -> None:
    atomic_write_json(DataDir(data_dir).rollout_state, state.to_json())
