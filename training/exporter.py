"""The trainer's Prometheus metrics, all prefixed `heed_trainer_` (`heed trainer --metrics-port`).

What a round came to is read from the round reports, which survive a restart: the count of
rounds since the last published one is what an alert on failing rounds wants, and a counter
that starts again at zero on every restart would forget them. (A round that crashes writes no
report: a trainer crashing in every round shows as its pod's restarts.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from heed.trainer_files import TrainerFiles

DECISIONS = ("published", "rejected", "skipped")


def decision_of(report: dict[str, Any]) -> str:
    """A report's decision as one word: published, rejected or skipped (a round in progress has none)."""
    return str(report.get("decision", "")).split(" ", 1)[0].rstrip(":")


class _Reports(Collector):
    """The round reports' figures, read at each scrape (a few small JSON files)."""

    def __init__(self, files: TrainerFiles) -> None:
        self.files = files
        # Each report's figures, read once while its file is unchanged (a finished round's never
        # changes): a scrape then reads only what is new, however many rounds there were.
        self._read: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def _summaries(self) -> list[dict[str, Any]]:
        summaries, read = [], {}
        for path in self.files.report_paths():
            try:
                stat = path.stat()
                key = (stat.st_mtime_ns, stat.st_size)
                cached = self._read.get(path)
                if cached is None or cached[0] != key:
                    report = json.loads(path.read_text())
                    cached = (key, {k: report[k] for k in ("decision", "started", "finished") if k in report})
            except (OSError, ValueError):  # being replaced right now: the next scrape reads it
                continue
            read[path] = cached
            summaries.append(cached[1])
        self._read = read
        return summaries

    def collect(self) -> Iterator[Any]:
        reports = [r for r in self._summaries() if decision_of(r) in DECISIONS]
        rounds = CounterMetricFamily(
            "heed_trainer_rounds", "Rounds finished, by decision (from the round reports).", labels=["decision"]
        )
        for decision in DECISIONS:
            rounds.add_metric([decision], sum(decision_of(r) == decision for r in reports))
        yield rounds
        since = 0
        for report in reversed(reports):
            if decision_of(report) == "published":
                break
            since += 1
        yield GaugeMetricFamily(
            "heed_trainer_rounds_since_published",
            "Rounds finished since the last one that published a version (rejected or skipped).",
            value=since,
        )
        last = reports[-1] if reports else {}
        yield GaugeMetricFamily(
            "heed_trainer_last_round_skipped",
            "1 when the last round was skipped (its estimated memory over --memory-budget-gib; it is tried again"
            " as the same round, so it counts once in the rounds), else 0.",
            value=float(decision_of(last) == "skipped"),
        )
        finished = last.get("finished", last.get("started", 0.0))
        yield GaugeMetricFamily(
            "heed_trainer_last_round_end_timestamp_seconds",
            "When the last round finished (Unix time; 0: none yet).",
            value=float(finished or 0.0),
        )
        duration = float(finished - last["started"]) if last.get("finished") and last.get("started") else 0.0
        yield GaugeMetricFamily(
            "heed_trainer_last_round_duration_seconds",
            "Wall time of the last round that ran its stages (0: none yet).",
            value=duration,
        )


class TrainerMetrics:
    """The trainer's own registry: the reports' figures and what the trainer is doing now."""

    def __init__(self, files: TrainerFiles) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Reports(files))
        self.pending = Gauge(
            "heed_trainer_feedback_pending",
            "New feedback since the last round, as counted towards --min-new-feedback.",
            registry=self.registry,
        )
        self.needed = Gauge(
            "heed_trainer_feedback_needed",
            "The new feedback a round needs (--min-new-feedback).",
            registry=self.registry,
        )
        self.round_running = Gauge(
            "heed_trainer_round_running", "1 while a round trains, else 0.", registry=self.registry
        )
        self.threads = Gauge(
            "heed_trainer_torch_threads",
            "The threads torch computes with now (with --threads 0: the cores the rest of the machine leaves free).",
            registry=self.registry,
        )
        self.last_poll = Gauge(
            "heed_trainer_last_poll_timestamp_seconds",
            "When the trainer last looked at the event log (Unix time).",
            registry=self.registry,
        )
        self.registry_versions = Gauge(
            "heed_trainer_registry_versions",
            "Versions in the policy registry, after the trainer last pruned it (--keep-versions).",
            registry=self.registry,
        )
        self.registry_bytes = Gauge(
            "heed_trainer_registry_bytes",
            "Bytes of the policy registry's versions on disk, after the trainer last pruned it.",
            registry=self.registry,
        )
        self.pruned = Counter(
            "heed_trainer_registry_pruned_versions",
            "Versions the trainer pruned from the policy registry since it started.",
            registry=self.registry,
        )

    def looked(self) -> None:
        self.last_poll.set(time.time())

    def serve(self, port: int, host: str) -> Any:
        """Serve /metrics on ``host:port`` in a thread; returns the server (``shutdown()`` ends it)."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return server
