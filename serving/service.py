"""The service core both surfaces share: engine slots, event log, completion and feedback services."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from heed.eventlog import EventStore
from serving.auth import ApiKeys
from serving.completions import CompletionService
from serving.config import ServeConfig
from serving.engine import EngineSlot
from serving.event_writer import EventWriter
from serving.feedback import FeedbackService
from serving.metrics import ServiceMetrics


@dataclass
class Service:
    config: ServeConfig
    keys: ApiKeys
    metrics: ServiceMetrics
    writer: EventWriter
    completions: CompletionService
    feedback: FeedbackService
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, config: ServeConfig, keys: ApiKeys, store: EventStore, slots: dict[str, EngineSlot]) -> Service:
        metrics = ServiceMetrics()
        metrics.seed_thumbs(store.thumb_counts())
        writer = EventWriter(store, metrics)
        completions = CompletionService(slots, config.served_model_name, writer, metrics, max_n=config.max_n)
        return cls(config, keys, metrics, writer, completions, FeedbackService(writer, metrics))
