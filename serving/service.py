"""The service core both surfaces share: engine slots and router, event log, completion and
feedback services, and the rollout controller.

    request -> CompletionService.prepare -> Router.route -> EngineSlot (Slots) -> generate
            -> EventWriter (event log) -> Router.observe
    RolloutController: registry -> Slots.load (canary) -> judge on the log's feedback and the
            router's traffic -> promote / roll back -> RolloutState -> Router.follow
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from heed.eventlog import EventStore
from heed.gpu import GpuShare
from heed.registry import PolicyRegistry
from heed.rollout import RolloutRule, RolloutStore
from serving.adapters import AdapterEngine
from serving.auth import ApiKeys
from serving.completions import CompletionService
from serving.config import ServeConfig
from serving.controller import RolloutController
from serving.engine import EngineSettings, EngineSlot
from serving.event_writer import EventWriter
from serving.feedback import FeedbackService
from serving.metrics import ServiceMetrics
from serving.router import Router
from serving.slots import Slots
from serving.tool_parsing import load_parser
from serving.tracing import Tracing


@dataclass
class Service:
    config: ServeConfig
    keys: ApiKeys
    admin_keys: ApiKeys
    metrics: ServiceMetrics
    writer: EventWriter
    store: EventStore
    registry: PolicyRegistry
    slots: Slots
    router: Router
    completions: CompletionService
    feedback: FeedbackService
    rollout: RolloutController
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        config: ServeConfig,
        keys: ApiKeys,
        admin_keys: ApiKeys,
        store: EventStore,
        stable: EngineSlot,
        registry: PolicyRegistry,
        rollouts: RolloutStore,
        leads: Callable[[], bool] | None = None,
        adapters: AdapterEngine | None = None,
    ) -> Service:
        """``leads``: whether this replica's rollout controller decides (None: it always does);
        ``adapters``: adapter mode's one engine (``stable`` is its view), None in full mode."""
        metrics = ServiceMetrics()
        metrics.seed_thumbs(store.thumb_counts())
        writer = EventWriter(store, metrics, threads=store.writers)
        slots = Slots(
            stable, stable.settings, config.data_dir, metrics, engine_stats=config.engine_stats, adapters=adapters
        )
        router = Router(slots, config.served_model_name)
        rollout = RolloutController(
            rollouts=rollouts,
            registry=registry,
            store=store,
            slots=slots,
            router=router,
            metrics=metrics,
            rule=rollout_rule(config),
            auto_canary=config.registry_poll_s > 0,
        )
        if leads is not None:
            rollout.leads = leads
        pinners, namers = frozenset(config.pin_principals), frozenset(config.user_principals)
        completions = CompletionService(
            router,
            writer,
            metrics,
            max_n=config.max_n,
            may_pin=lambda principal: keys.open or principal in pinners,
            may_name_users=lambda principal: keys.open or principal in namers,
            max_in_flight=config.max_in_flight,
            tracing=Tracing(config.otlp_traces_endpoint),
            tool_parser=load_parser(config.tool_call_parser) if config.tool_call_parser else None,
        )
        feedback = FeedbackService(writer, metrics)
        return cls(
            config, keys, admin_keys, metrics, writer, store, registry, slots, router, completions, feedback, rollout
        )


@dataclass(frozen=True)
class Health:
    """What the probes say, for every surface. Live: no engine has died (else the process needs a
    restart). Ready: live, the stable slot serves and the event log takes writes."""

    live: bool
    ready: bool
    dead_engines: list[str]
    event_log_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "ready": self.ready,
            "dead_engines": self.dead_engines,
            "event_log": {"writable": self.event_log_error is None, "error": self.event_log_error},
        }


def dead_engines(slots: Slots) -> list[str]:
    """The slots whose engine has died: liveness, which asks nothing of the event log (a probe of a
    locked log can take its busy timeout, longer than a liveness probe waits)."""
    return [name for name, slot in slots.items() if slot.dead]


async def health(slots: Slots, writer: EventWriter) -> Health:
    dead = dead_engines(slots)
    writable = await writer.writable()
    ready = not dead and slots.stable.ready and writable
    return Health(not dead, ready, dead, writer.failure)


def engine_settings(config: ServeConfig) -> EngineSettings:
    return EngineSettings(
        max_model_len=config.max_model_len,
        kv_cache_gib=config.kv_cache_gib,
        dtype=config.dtype,
        enforce_eager=config.enforce_eager,
        max_num_seqs=config.max_num_seqs,
        seed=config.seed,
        gpu_memory_utilization=config.gpu_memory_utilization,
        canary_gpu_memory_utilization=config.canary_gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        otlp_traces_endpoint=config.otlp_traces_endpoint,
        drain_timeout_s=config.swap_drain_timeout_s,
        lease_timeout_s=config.swap_wait_timeout_s,
        lora=config.policy_mode == "adapter",
        max_lora_rank=config.max_lora_rank,
        max_loras=config.max_loras,
        max_cpu_loras=config.max_cpu_loras,
    )


def gpu_shares(config: ServeConfig) -> list[GpuShare]:
    """What the node's engines claim of each GPU: the stable and canary slots (one engine for both
    in adapter mode), and the co-located trainer's rollout engine."""
    shares = [
        GpuShare("stable slot", "--gpu-memory-utilization", config.gpu_memory_utilization, config.tensor_parallel_size)
    ]
    if config.policy_mode == "full":
        shares.append(
            GpuShare(
                "canary slot",
                "--canary-gpu-memory-utilization",
                config.canary_gpu_memory_utilization,
                config.tensor_parallel_size,
            )
        )
    if config.with_trainer:
        shares.append(
            GpuShare(
                "trainer's rollout engine", "--trainer-gpu-memory-utilization", config.trainer_gpu_memory_utilization
            )
        )
    return shares


def rollout_rule(config: ServeConfig) -> RolloutRule:
    return RolloutRule(
        steps=tuple(config.canary_steps),
        min_feedback_per_step=config.min_feedback_per_step,
        advance_probability=config.advance_probability,
        rollback_probability=config.rollback_probability,
        max_error_rate=config.max_canary_error_rate,
        max_caller_share=config.max_caller_share,
        max_canary_hours=config.max_canary_hours,
        max_feedback_per_step=config.max_feedback_per_step,
    )
