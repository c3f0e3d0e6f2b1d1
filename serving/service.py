"""The service core both surfaces share: engine slots and router, event log, completion and
feedback services, and the rollout controller."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from heed.eventlog import EventStore
from heed.registry import PolicyRegistry
from serving.auth import ApiKeys
from serving.completions import CompletionService
from serving.config import ServeConfig
from serving.engine import EngineSettings, EngineSlot
from serving.event_writer import EventWriter
from serving.feedback import FeedbackService
from serving.metrics import ServiceMetrics
from serving.rollout import RolloutController, RolloutRule


@dataclass
class Service:
    config: ServeConfig
    keys: ApiKeys
    admin_keys: ApiKeys
    metrics: ServiceMetrics
    writer: EventWriter
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
    ) -> Service:
        metrics = ServiceMetrics()
        metrics.seed_thumbs(store.thumb_counts())
        writer = EventWriter(store, metrics)
        rollout = RolloutController(
            data_dir=config.data_dir,
            registry=registry,
            store=store,
            slots={"stable": stable},
            metrics=metrics,
            rule=rollout_rule(config),
            engine_settings=stable.settings,
            auto_canary=config.registry_poll_s > 0,
        )
        completions = CompletionService(rollout, config.served_model_name, writer, metrics, max_n=config.max_n)
        return cls(config, keys, admin_keys, metrics, writer, completions, FeedbackService(writer, metrics), rollout)


def engine_settings(config: ServeConfig) -> EngineSettings:
    return EngineSettings(
        max_model_len=config.max_model_len,
        kv_cache_gib=config.kv_cache_gib,
        dtype=config.dtype,
        enforce_eager=config.enforce_eager,
        max_num_seqs=config.max_num_seqs,
        seed=config.seed,
        drain_timeout_s=config.swap_drain_timeout_s,
    )


def rollout_rule(config: ServeConfig) -> RolloutRule:
    return RolloutRule(
        steps=tuple(config.canary_steps),
        min_feedback_per_step=config.min_feedback_per_step,
        advance_probability=config.advance_probability,
        rollback_probability=config.rollback_probability,
        max_error_rate=config.max_canary_error_rate,
    )
