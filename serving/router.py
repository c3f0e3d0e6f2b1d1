"""The router: which engine slot answers a request, and what each version's traffic did.

A request for the service alias goes to the canary when the caller's sticky bucket
(``heed.callers.sticky_bucket`` of the request's ``user``, else of the API key's principal)
falls under the canary share; a caller stays on the same side while the share grows. A request
may name a served version instead (``model`` = the version, or the ``X-Heed-Policy-Version``
header / metadata). The router follows the rollout controller's split (``follow``) and counts
requests, server errors and latency per version (``observe``) for the controller's evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from heed.callers import caller_id, sticky_bucket
from heed.rollout import RolloutState
from serving.engine import EngineSlot
from serving.errors import Unavailable
from serving.slots import Slots


@dataclass
class Traffic:
    """Requests, server errors and latency of one version since the canary started (in memory)."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "latency_mean_s": self.latency_sum / self.requests if self.requests else None,
        }


class Router:
    def __init__(self, slots: Slots, served_model_name: str) -> None:
        self.slots = slots
        self.served_model_name = served_model_name
        self.canary: str | None = None  # the version the split sends ``canary_share`` percent to
        self.canary_share = 0.0
        self._traffic: dict[str, Traffic] = {}

    def follow(self, state: RolloutState) -> None:
        """Route by this rollout state from now on."""
        self.canary, self.canary_share = state.canary, state.canary_share if state.canary else 0.0

    def route(self, model: str, user: str | None, principal: str, pinned: str | None = None) -> EngineSlot:
        """The ready slot for a request that asked for ``model`` (the alias, or a served version)."""
        if model not in ("", self.served_model_name):
            slot = self.slots.for_version(model)
        elif pinned:
            slot = self.slots.for_version(pinned)
        else:
            slot = self._split(caller_id(user, principal))
        if not slot.ready:
            raise Unavailable("the engine is still loading; retry shortly (see GET /ready)", code="engine_loading")
        return slot

    def _split(self, caller: str) -> EngineSlot:
        canary = self.slots.canary
        # Only to a canary slot that holds the state's canary (a replica may still be loading it).
        routable = (
            self.canary is not None
            and canary is not None
            and canary.ready
            and canary.policy_version == self.canary
            and self.canary_share > 0
        )
        if routable and sticky_bucket(caller) < self.canary_share * 100:
            assert canary is not None
            return canary
        return self.slots.stable

    # ---- outcomes ------------------------------------------------------------------------
    def observe(self, version: str, latency_s: float, error: bool) -> None:
        traffic = self._traffic.setdefault(version, Traffic())
        traffic.requests += 1
        traffic.errors += int(error)
        traffic.latency_sum += latency_s

    def traffic(self, version: str) -> Traffic:
        return self._traffic.get(version, Traffic())

    def reset_traffic(self) -> None:
        """A new canary: its evidence (and stable's beside it) starts from zero."""
        self._traffic.clear()
