"""Prometheus metrics of the service, all prefixed `heed_` (exposed at GET /metrics)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from tens of ms (errors, feedback) to 42 min: a long answer on a CPU takes
# minutes (vLLM's own end-to-end buckets reach 7,680 s), and a histogram whose last bucket is
# below them puts them all in +Inf, where no quantile can be read.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)


class ServiceMetrics:
    """The service's own registry (not the global one, so tests and several servers don't clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine_metrics()
        self.requests = Counter(
            "heed_requests_total",
            "API requests served, by surface, endpoint, status and policy version.",
            ["api", "endpoint", "status", "policy_version"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "heed_request_duration_seconds",
            "Time from request received to last byte sent, by surface, endpoint, status and policy version.",
            ["api", "endpoint", "status", "policy_version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "heed_time_to_first_token_seconds",
            "Time from request received to the first generated token, by policy version.",
            ["policy_version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "heed_generated_tokens_total",
            "Completion tokens generated, by policy version.",
            ["policy_version"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "heed_prompt_tokens_total",
            "Prompt tokens processed, by policy version.",
            ["policy_version"],
            registry=self.registry,
        )
        self.feedback_events = Counter(
            "heed_feedback_events_total",
            "Feedback events logged, by kind and policy version.",
            ["kind", "policy_version"],
            registry=self.registry,
        )
        self.thumbs = Counter(
            "heed_feedback_thumbs_total",
            "Thumbs logged, by direction (up, down) and policy version.",
            ["direction", "policy_version"],
            registry=self.registry,
        )
        self.thumbs_up_ratio = Gauge(
            "heed_thumbs_up_ratio",
            "Share of thumbs that are up, over the whole event log, by policy version.",
            ["policy_version"],
            registry=self.registry,
        )
        self.engine_ready = Gauge(
            "heed_engine_ready",
            "1 when the engine slot is loaded and serving.",
            ["slot", "policy_version"],
            registry=self.registry,
        )
        self.event_log_write_duration = Histogram(
            "heed_event_log_write_duration_seconds",
            "Time to commit one record to the event log, by type.",
            ["type"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=self.registry,
        )
        self.rejected = Counter(
            "heed_requests_rejected_total",
            "Requests refused before any work to protect the service, by reason: overloaded (--max-in-flight"
            " completions), max_connections (--max-connections HTTP requests), metrics_and_admin (the 64"
            " places of /metrics and /admin/ calls).",
            ["reason"],
            registry=self.registry,
        )
        self.event_log_write_failures = Counter(
            "heed_event_log_write_failures_total",
            "Records the event log could not commit (disk full, database locked, ...), by type; each was a 503.",
            ["type"],
            registry=self.registry,
        )
        self.event_log_writable = Gauge(
            "heed_event_log_writable",
            "1 while the event log takes writes; 0 from a failed write until a write or a probe succeeds.",
            registry=self.registry,
        )
        self.event_log_writable.set(1)
        # ---- the loop: swaps and the rollout (per-version figures an outside tool can gate on)
        self.policy_swaps = Counter(
            "heed_policy_swaps_total",
            "In-place weight swaps of an engine slot, by slot and result (ok, failed).",
            ["slot", "result"],
            registry=self.registry,
        )
        self.policy_swap_duration = Histogram(
            "heed_policy_swap_duration_seconds",
            "Time an engine slot was closed to new requests during a swap (drain, reload, resume).",
            ["slot"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.policy_load_failures = Counter(
            "heed_policy_load_failures_total",
            "Policy versions refused or failed to load (checksums, shapes, engine errors), by slot.",
            ["slot"],
            registry=self.registry,
        )
        self.canary_share = Gauge(
            "heed_rollout_canary_traffic_ratio",
            "Share of routed traffic sent to the canary (0 when there is none).",
            registry=self.registry,
        )
        self.policy_traffic = Gauge(
            "heed_policy_traffic_ratio",
            "Share of routed traffic each served policy version gets.",
            ["policy_version"],
            registry=self.registry,
        )
        self.rollout_step = Gauge(
            "heed_rollout_step", "Index of the canary's current rollout step.", registry=self.registry
        )
        self.rollout_paused = Gauge(
            "heed_rollout_paused", "1 when the rollout controller is paused.", registry=self.registry
        )
        self.rollout_in_sync = Gauge(
            "heed_rollout_in_sync",
            "1 when this replica's slots hold what the rollout state names (0 while a load failed: it is retried).",
            registry=self.registry,
        )
        self.rollout_in_sync.set(1)
        self.rollout_leader = Gauge(
            "heed_rollout_leader",
            "1 on the replica whose rollout controller decides (one among the replicas of a shared database).",
            registry=self.registry,
        )
        self.canary_better_probability = Gauge(
            "heed_rollout_canary_better_probability",
            "Posterior probability that the canary's thumbs-up rate exceeds stable's.",
            registry=self.registry,
        )
        self.rollout_thumbs = Gauge(
            "heed_rollout_thumbs",
            "Thumbs since the canary started, by role (stable, canary) and direction.",
            ["role", "direction"],
            registry=self.registry,
        )
        self.rollout_decisions = Counter(
            "heed_rollout_decisions_total",
            "Rollout decisions, by action (canary_started, advanced, promoted, rolled_back, refused, ...) and by"
            " the controller's rule that took it (error_rate, p_worse, p_better, feedback_limit, time_limit;"
            " empty for an admin's and the rest).",
            ["action", "rule"],
            registry=self.registry,
        )
        self._thumb_totals: dict[str, list[int]] = {}

    def _engine_metrics(self) -> None:
        """Each engine slot's own figures, from vLLM's per-step stats (``observe_engine``), named
        after vLLM's server's (vllm:num_requests_running, ...), labelled by slot and by the
        policy version the slot serves at the step."""
        slot = ["slot", "policy_version"]
        r = self.registry
        self.engine_running = Gauge(
            "heed_engine_requests_running", "Requests in the engine's running batch.", slot, registry=r
        )
        self.engine_waiting = Gauge(
            "heed_engine_requests_waiting", "Requests waiting to be scheduled.", slot, registry=r
        )
        self.engine_kv_cache = Gauge(
            "heed_engine_kv_cache_usage_ratio", "Share of the engine's KV cache blocks in use (0-1).", slot, registry=r
        )
        self.engine_preemptions = Counter(
            "heed_engine_preemptions_total", "Requests the engine preempted (KV cache full).", slot, registry=r
        )
        self.engine_ttft = Histogram(
            "heed_engine_time_to_first_token_seconds",
            "Engine time from a request's arrival to its first token.",
            slot,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_itl = Histogram(
            "heed_engine_inter_token_latency_seconds",
            "Time between two tokens of one request.",
            slot,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
            registry=r,
        )
        self.engine_queue = Histogram(
            "heed_engine_request_queue_time_seconds",
            "Time a finished request waited in the engine's queue.",
            slot,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._engine_labels: dict[str, str] = {}  # slot -> the policy version its gauges are labelled with

    def observe_engine(self, slot: str, policy_version: str, scheduler: Any, iteration: Any) -> None:
        """One engine step's vLLM stats (SchedulerStats, IterationStats; either may be None). A
        slot's gauges move to the new version's labels when the slot's version changes (a swap):
        no series is left behind under the version it served before."""
        last = self._engine_labels.get(slot)
        if last is not None and last != policy_version:
            for gauge in (self.engine_running, self.engine_waiting, self.engine_kv_cache):
                with contextlib.suppress(KeyError):
                    gauge.remove(slot, last)
        self._engine_labels[slot] = policy_version
        labels = (slot, policy_version)
        if scheduler is not None:
            self.engine_running.labels(*labels).set(scheduler.num_running_reqs)
            self.engine_waiting.labels(*labels).set(scheduler.num_waiting_reqs)
            self.engine_kv_cache.labels(*labels).set(scheduler.kv_cache_usage)
        if iteration is not None:
            if iteration.num_preempted_reqs:
                self.engine_preemptions.labels(*labels).inc(iteration.num_preempted_reqs)
            for seconds in iteration.time_to_first_tokens_iter:
                self.engine_ttft.labels(*labels).observe(seconds)
            for seconds in iteration.inter_token_latencies_iter:
                self.engine_itl.labels(*labels).observe(seconds)
            for finished in iteration.finished_requests:
                self.engine_queue.labels(*labels).observe(finished.queued_time)

    def retire_versions(self, served: set[str]) -> None:
        """Remove the per-version series of every policy version not in ``served`` (what the rollout
        serves or may go back to): each published version would otherwise add hundreds of series
        for good. A late request or thumb on a retired version brings its series back until the
        next retirement."""
        per_version = (
            (self.requests, ("api", "endpoint", "status", "policy_version")),
            (self.request_duration, ("api", "endpoint", "status", "policy_version")),
            (self.time_to_first_token, ("policy_version",)),
            (self.generated_tokens, ("policy_version",)),
            (self.prompt_tokens, ("policy_version",)),
            (self.feedback_events, ("kind", "policy_version")),
            (self.thumbs, ("direction", "policy_version")),
            (self.thumbs_up_ratio, ("policy_version",)),
            (self.engine_running, ("slot", "policy_version")),
            (self.engine_waiting, ("slot", "policy_version")),
            (self.engine_kv_cache, ("slot", "policy_version")),
            (self.engine_preemptions, ("slot", "policy_version")),
            (self.engine_ttft, ("slot", "policy_version")),
            (self.engine_itl, ("slot", "policy_version")),
            (self.engine_queue, ("slot", "policy_version")),
        )
        for metric, names in per_version:
            stale = {
                values
                for family in metric.collect()
                for sample in family.samples
                if all(n in sample.labels for n in names)
                and (values := tuple(sample.labels[n] for n in names))[-1] not in served
            }
            for values in stale:
                with contextlib.suppress(KeyError):
                    metric.remove(*values)

    def seed_thumbs(self, counts: dict[str, tuple[int, int]]) -> None:
        """Start the up-ratio from the log's totals, so it survives restarts."""
        for version, (up, down) in counts.items():
            self._thumb_totals[version] = [up, down]
            self._update_ratio(version)

    def record_thumb(self, policy_version: str, thumb: int) -> None:
        self.thumbs.labels("up" if thumb > 0 else "down", policy_version).inc()
        totals = self._thumb_totals.setdefault(policy_version, [0, 0])
        totals[0 if thumb > 0 else 1] += 1
        self._update_ratio(policy_version)

    def _update_ratio(self, version: str) -> None:
        up, down = self._thumb_totals[version]
        if up + down:
            self.thumbs_up_ratio.labels(version).set(up / (up + down))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
