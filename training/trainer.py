"""`heed trainer`: the co-located training service. It follows a data directory's event log and
turns new feedback into a new policy version, one round at a time:

    enough new feedback? -> data (training callers / held-out callers) -> reward model
    (warm-started from the last round's) -> PPO-ptx from the stable policy -> evaluate (held-out
    RM accuracy, win rate against stable, KL) -> gate -> publish to the registry -> report, state.

Crash safety (SIGKILL at any point loses and double-counts nothing): the watermark in
``DATA_DIR/trainer/state.json`` only advances when a round completes; a round first records the
log position it reads up to, so a redone round trains on the same events; its work happens in
``trainer/work/`` (removed at start); a version the registry holds but the state does not know
(a crash between publishing and the state write) is adopted instead of published twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from heed.datadir import DataDir, atomic_folder, exclusive_lock, registry_location
from heed.eventlog import EventStore, LogFollower, is_database_url, log_location, open_store, redacted
from heed.registry import PolicyRegistry, RegistryError
from heed.rollout import RolloutState, open_rollout_store
from heed.trainer_files import TrainerFiles, TrainerState
from training import runtime
from training.builders import parse_score_keys
from training.config import SamplingEngine, TrainerConfig
from training.exporter import TrainerMetrics
from training.round import AdapterStart, RoundData, RoundResult, Stopped, build_round_data, train_round
from training.sampling import weight_transfer_backend
from training.threads import follow_free_cores

log = logging.getLogger(__name__)


# ---- recovery ------------------------------------------------------------------------------------


def recover(files: TrainerFiles, registry: PolicyRegistry) -> TrainerState:
    """Clear what a killed round left behind and adopt a version it published but did not record."""
    registry.remove_stale()
    shutil.rmtree(files.work, ignore_errors=True)
    state = TrainerState.load(files.state)
    unknown = [  # a version of this trainer's: published by a round, which its data names
        m
        for m in registry.versions()
        if m.source == "trainer" and {"round", "feedback_total"} <= set(m.data)
        and m.version not in state.versions and m.watermark >= state.watermark
    ]  # fmt: skip
    if unknown:
        adopted = unknown[-1]
        round_ = int(adopted.data["round"])
        rm = f"rm/round-{round_:04d}"
        state = replace(
            state,
            watermark=adopted.watermark,
            round=round_,
            feedback=float(adopted.data["feedback_total"]),
            reward_model=rm if (files.root / rm).is_dir() else state.reward_model,
            versions=(*state.versions, *(m.version for m in unknown)),
            pending_watermark=None,
        )
        log.warning(
            "round %d: adopting %s (watermark %d): it was published before the trainer stopped, "
            "but the state had not recorded it", round_, adopted.version, adopted.watermark,
        )  # fmt: skip
        if not files.report(round_).exists():
            decision = f"published {adopted.version} (adopted at restart)"
            report = {"round": round_, "watermark": adopted.watermark, "data": adopted.data, "decision": decision}
            files.write_report(round_, {**report, "version": adopted.version, "evaluation": adopted.evaluation})
        state.save(files.state)
    if files.reward_models.is_dir():  # reward models of rounds that never completed
        for child in files.reward_models.iterdir():
            if f"rm/{child.name}" != state.reward_model:
                shutil.rmtree(child, ignore_errors=True)
    return state


# ---- the loop ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT ask the loop to stop between two stages; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("stopping (signal %d): a round stops after its current stage; a second signal stops at once", signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class LostLease(Exception):
    """The event log's trainer lock was lost during a round (its connection gone): it must not publish."""


def finish_round(
    files: TrainerFiles,
    registry: PolicyRegistry,
    state: TrainerState,
    data: RoundData,
    result: RoundResult,
    report: dict[str, Any],
) -> TrainerState:
    """Keep the new reward model (when it passed its check), publish the candidate (when every
    check passed), write the report, then the state. In this order a crash anywhere leaves
    either a round to redo or a published version to adopt (``recover``)."""
    round_, stable = report["round"], report["stable"]
    reward_model = state.reward_model
    if result.reward_model_passed:  # a reward model worse than the last one is not built on
        reward_model = f"rm/round-{round_:04d}"
        with atomic_folder(files.root / reward_model) as dest:  # moved in whole, or not at all
            for part in result.reward_model.iterdir():
                os.rename(part, dest / part.name)
    versions = state.versions
    failed = [c for c in result.checks if not c.passed]
    if failed or result.candidate is None:
        decision, version = "rejected: " + "; ".join(c.reason() for c in failed), None
    else:
        counts = {"round": round_, **report["data"]}
        adapter = result.candidate_adapter is not None
        manifest = registry.publish(
            result.candidate_adapter if adapter else result.candidate,  # type: ignore[arg-type]
            parent=stable,
            watermark=data.watermark,
            data=counts,
            evaluation=result.evaluation,
            source="trainer",
            mode="adapter" if adapter else "full",
            base=result.base if adapter else None,
        )
        version = manifest.version
        versions, decision = (*versions, version), f"published {version}"
    if result.fell_back is not None:  # said wherever the decision is shown (trainer status, dashboard)
        decision += f" (judged by the previous reward model, {state.reward_model}: this round's {result.fell_back})"
    report.update(
        finished=time.time(),
        stages=result.stages,
        gate=[c.to_json() for c in result.checks],
        reward_model=reward_model,
        decision=decision,
        version=version,
    )
    files.write_report(round_, report)
    new_state = replace(
        state,
        watermark=data.watermark,
        round=round_,
        feedback=float(report["data"]["feedback_total"]),
        reward_model=reward_model,
        versions=versions,
        pending_watermark=None,
    )
    new_state.save(files.state)
    if state.reward_model and state.reward_model != reward_model:
        shutil.rmtree(files.root / state.reward_model, ignore_errors=True)
    return new_state


def _kinds(data: RoundData) -> str:
    """What ``data`` holds, by kind, both parts together."""
    counts = {k: v + data.heldout.counts()[k] for k, v in data.train.counts().items()}
    kinds = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in ("rankings", "thumbs", "ratings", "corrections"))
    unused = data.train.unused_scores + data.heldout.unused_scores
    if unused:  # named scores kept in the log that no --score-keys entry turns into a signal
        top = ", ".join(f"{key} {n}" for key, n in unused.most_common(5))
        kinds += f" ({sum(unused.values())} named scores not used: {top})"
    return kinds


PollStatus = Literal["ran", "skipped", "waiting", "holding"]


@dataclass
class Poll:
    """What one look at the log came to: a round ``ran``, was ``skipped``, or we are ``waiting``
    (for the log to change) or ``holding`` (for a while, whatever the log does)."""

    status: PollStatus
    message: str
    state: TrainerState
    progress: bool = False  # the message only counts the feedback so far
    pending: float | None = None  # the new feedback counted towards a round, when it was counted


def poll_once(
    cfg: TrainerConfig,
    files: TrainerFiles,
    registry: PolicyRegistry,
    store: EventStore,
    rollout: RolloutState,
    state: TrainerState,
    stop: threading.Event,
    follower: LogFollower | None = None,
    metrics: TrainerMetrics | None = None,
    still_mine: Callable[[], bool] | None = None,
) -> Poll:
    """Look at the log; run a round when there is enough new data (or a round was interrupted).
    With a ``follower``, only what is new in the log is read; ``rollout`` is the rollout state
    as just read. ``still_mine``: whether the log is still this trainer's, asked again before a
    round publishes (LostLease if not: another trainer may train the same feedback meanwhile)."""
    round_ = state.round + 1
    stable = rollout.stable
    if stable is None:
        return Poll("waiting", "no stable policy version yet (heed serve records it in the rollout state)", state)
    if rollout.canary and state.pending_watermark is None:
        # The next round starts from the verdict: the canary promoted, or stable kept.
        return Poll("waiting", f"canary {rollout.canary} is being judged; the next round starts after", state)
    if cfg.take_up_wait_s > 0 and state.versions and state.pending_watermark is None:  # else: from the old stable
        try:
            last = registry.manifest(state.versions[-1])
        except RegistryError:
            last = None
        if (
            last is not None
            and last.sequence > rollout.considered_sequence
            and time.time() - last.created < cfg.take_up_wait_s
        ):
            message = f"{last.version} is published; the next round starts after the server takes it up"
            return Poll("holding", message, state)
    watermark = state.pending_watermark if state.pending_watermark is not None else store.last_seq()
    build = functools.partial(
        build_round_data,
        store,
        watermark,
        cfg.heldout_fraction,
        cfg.max_per_caller,
        follower,
        cfg.score_keys,
    )
    new = None  # a round to redo is not counted again
    if state.pending_watermark is None:
        # What was logged since the last round, each caller's latest max_per_caller of each kind
        # (not the growth of the capped whole, which stops once every caller has reached the cap),
        # and no caller above max_caller_share of it: one caller, or a few, never start a round.
        fresh = build(since=state.watermark)
        new = fresh.counted(cfg)
        if new < cfg.min_new_feedback:
            share = ""
            if cfg.max_caller_share < 1:  # k callers carry at most k * share of it: fewer than 1 / share count 0
                fewest = math.ceil(1 / cfg.max_caller_share - 1e-9)
                share = f", none above {cfg.max_caller_share:.0%} of it (so {fewest} callers at least)"
            return Poll(
                "waiting",
                f"{new:g} new feedback since the last round (log position {state.watermark}) from "
                f"{fresh.callers_sending()} callers{share}; a round needs {cfg.min_new_feedback:g} ({_kinds(fresh)})",
                state,
                progress=True,
                pending=new,
            )
    # The round's data: no caller gives more than max_caller_share of any kind, on either side
    # (the threshold above weighs the callers' shares itself, over both sides together).
    data = build(max_caller_share=cfg.max_caller_share)
    if not data.train.reward_examples():
        return Poll("waiting", "no feedback from training callers yet (every caller so far is held out)", state)
    try:
        stable_manifest = registry.manifest(stable)
        if stable_manifest.mode == "adapter" and rollout.mode != "adapter":  # before hashing anything
            message = f"the stable version {stable} is an adapter and the server serves full versions: nothing to train"
            return Poll("waiting", message, state)
        stable_dir = registry.verify(stable)
        base = stable_manifest.base if stable_manifest.mode == "adapter" else stable
        base_dir = registry.verify(base) if base and base != stable else stable_dir
    except (RegistryError, ValueError, TypeError) as exc:
        return Poll("waiting", f"cannot train from the stable version {stable}: {exc}", state)

    counted = f"{new:g} new feedback" if new is not None else "the interrupted round's feedback"
    log.info("round %d: %s up to log position %d; training from %s", round_, counted, watermark, stable)
    vllm = cfg.ppo.rollout == SamplingEngine.VLLM
    lora = rollout.mode == "adapter"
    estimate = runtime.ppo_memory_gib(base_dir, runtime.use_bf16(None), vllm, lora)  # PPO: the peak
    memory = {k: round(v, 3) for k, v in estimate.items()}
    parts = ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k not in ("total", "parameters"))
    log.info(
        "round %d: memory estimate %.2f GiB (%s) for a budget of %.2f GiB",
        round_, memory["total"], parts, cfg.memory_budget_gib,
    )  # fmt: skip
    report: dict[str, Any] = {
        "round": round_,
        "started": time.time(),
        "stable": stable,
        "previous_watermark": state.watermark,
        "watermark": watermark,
        "mode": rollout.mode,
        "data": data.counts(cfg),
        "memory": {"estimate_gib": memory, "budget_gib": cfg.memory_budget_gib},
    }
    if memory["total"] > cfg.memory_budget_gib:
        decision = (
            f"skipped: the estimated memory {memory['total']:.2f} GiB exceeds the budget of "
            f"{cfg.memory_budget_gib:.2f} GiB (--memory-budget-gib)"
        )
        files.write_report(round_, {**report, "decision": decision, "version": None})
        return Poll("skipped", f"round {round_}: {decision}", state)

    state = replace(state, pending_watermark=watermark)
    state.save(files.state)
    work = files.work / f"round-{round_:04d}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    previous_rm = files.root / state.reward_model if state.reward_model else None
    if metrics is not None:
        metrics.round_running.set(1)
    adapter = None
    if rollout.mode == "adapter":  # an adapter on the base (train_round merges the stable one for its reference)
        assert base is not None
        adapter = AdapterStart(base, base_dir, stable_dir if stable_manifest.mode == "adapter" else None)
    try:
        result = train_round(cfg, data, work, stable_dir, previous_rm, round_, stop, adapter)  # Stopped between stages
    finally:
        if metrics is not None:
            metrics.round_running.set(0)
    if still_mine is not None and not still_mine():  # a round takes minutes: the lease may have gone meanwhile
        raise LostLease(f"lost the event log's trainer lock during round {round_}: it publishes nothing")
    state = finish_round(files, registry, state, data, result, report)
    shutil.rmtree(work, ignore_errors=True)
    return Poll("ran", f"round {round_}: {report['decision']}", state, pending=0.0)


@contextlib.contextmanager
def _the_logs_one_trainer(event_log: str, stop: threading.Event, every_s: float) -> Iterator[Callable[[], bool] | None]:
    """A log in a shared database has one trainer, wherever the others run: a second one waits for
    the first one's advisory lock (a SQLite log is one data directory's: its file lock does it).
    Yields a check that the log is still this trainer's (None: stopped while waiting)."""
    if not is_database_url(event_log):
        yield lambda: True
        return
    from heed.eventlog.postgres import TRAINER_LOCK, advisory_lease

    def waiting() -> None:
        log.warning("another trainer holds the event log's trainer lock (%s): waiting for it", redacted(event_log))

    with advisory_lease(event_log, TRAINER_LOCK, stop, every_s, waiting) as lease:
        yield lease.held if lease is not None else None


def run_trainer(cfg: TrainerConfig, stop: threading.Event | None = None) -> int:
    """Follow the log until stopped (with ``once``: at most one round); returns the exit code."""
    stop = stop or threading.Event()
    try:
        parse_score_keys(cfg.score_keys)
    except ValueError as exc:
        log.error("--score-keys: %s", exc)
        return 2
    try:
        weight_transfer_backend(cfg.ppo.weight_transfer, runtime.resolve_device(cfg.device))
    except ValueError as exc:  # before anything starts, not in the first round
        log.error("%s", exc)
        return 2
    problems = cfg.ppo.problems()
    if not cfg.max_kl >= 0:  # also PPO's --stop-kl in a round
        problems.append(f"--max-kl must be 0 or more; got {cfg.max_kl:g}")
    if not 0 <= cfg.rm_accuracy_z < math.inf:  # at infinity every bound is 1
        problems.append(f"--rm-accuracy-z must be a number from 0; got {cfg.rm_accuracy_z:g}")
    if problems:
        for problem in problems:
            log.error("%s", problem)
        return 2
    if cfg.keep_versions < 0:
        log.error("--keep-versions must be 0 (keep every version) or more; got %d", cfg.keep_versions)
        return 2
    if cfg.nice:
        os.nice(cfg.nice)
    data_dir = DataDir(cfg.data_dir)
    files = TrainerFiles.of(data_dir.root)
    registry = PolicyRegistry(registry_location(cfg.registry, cfg.data_dir))
    # Served from the start, also while waiting for another trainer's lock: a liveness probe on
    # /metrics sees a live process, and the reports' figures are there at once.
    metrics = TrainerMetrics(files)
    metrics.needed.set(cfg.min_new_feedback)
    exporter = None
    if cfg.metrics_port:
        try:
            exporter = metrics.serve(cfg.metrics_port, cfg.metrics_host)
        except OSError as exc:
            log.error("--metrics-port %d: cannot listen on %s (%s)", cfg.metrics_port, cfg.metrics_host, exc)
            return 2
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)
    unfollow = None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif runtime.resolve_device(cfg.device).type == "cpu":  # a GPU's trainer computes on the GPU
        unfollow = follow_free_cores(on_change=metrics.threads.set)
    try:
        metrics.threads.set(torch.get_num_threads())
        return _follow(cfg, stop, files, registry, metrics)
    finally:
        if unfollow is not None:
            unfollow()
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


def prune_versions(registry: PolicyRegistry, rollout: RolloutState, keep: int) -> list[str]:
    """Remove the trainer's published versions past the newest ``keep`` that the rollout neither
    serves nor may go back to, nor has yet taken up (``keep`` 0: none); returns their names."""
    if keep <= 0:
        return []
    doomed = registry.prunable(keep, rollout.in_use(), rollout.considered_sequence)
    sizes = {m.version: registry.size(m.version) for m in doomed}
    removed = [m.version for m in registry.remove(doomed)]
    if removed:
        freed = sum(sizes.get(v, 0) for v in removed) / 2**30
        log.info(
            "pruned %s from the registry: %.2f GiB freed (kept the newest %d and what the rollout uses)",
            ", ".join(removed),
            freed,
            keep,
        )
    return removed


def _follow(
    cfg: TrainerConfig, stop: threading.Event, files: TrainerFiles, registry: PolicyRegistry, metrics: TrainerMetrics
) -> int:
    """run_trainer's loop, under the data directory's lock and the log's."""
    try:
        lock = exclusive_lock(files.root / "lock")
    except BlockingIOError:
        log.error("another trainer is running on %s", cfg.data_dir)
        return 1
    event_log = log_location(cfg.event_log, cfg.data_dir)
    with lock, _stop_on_signals(stop), _the_logs_one_trainer(event_log, stop, cfg.poll_s) as still_mine:
        if still_mine is None:
            log.info("stopped while waiting for the other trainer")
            return 0
        state = recover(files, registry)
        log.info("trainer on %s: %d rounds done, watermark %d", cfg.data_dir, state.round, state.watermark)
        log.info("reading the event log %s; publishing to %s", redacted(event_log), registry.root)
        store = open_store(event_log)
        rollouts = open_rollout_store(event_log, cfg.data_dir)
        follower = LogFollower(store)
        looked_at: tuple[Any, ...] = ()
        pruned_for: tuple[Any, ...] = ()
        said, said_progress, said_at = "", False, 0.0
        try:
            while not stop.is_set():
                if not still_mine():
                    log.error("lost the event log's trainer lock (its connection is gone): stopping")
                    return 1
                # Nothing new in the log, the stable version and the state: the last answer stands.
                try:
                    rollout, _ = rollouts.load()
                    seen = (rollout.stable, rollout.canary, rollout.considered_sequence, rollout.mode)
                    now = (store.last_seq(), *seen, state)
                except Exception as exc:  # a database that is briefly unreachable: look again later
                    log.warning("cannot read the log or the rollout state (%s); looking again in %g s", exc, cfg.poll_s)
                    stop.wait(cfg.poll_s)
                    continue
                metrics.looked()  # it read the log, whether or not anything changed
                if now == looked_at:
                    stop.wait(cfg.poll_s)
                    continue
                if seen != pruned_for:  # the rollout moved (a version taken up, promoted, rolled back)
                    try:
                        metrics.pruned.inc(len(prune_versions(registry, rollout, cfg.keep_versions)))
                        versions = registry.versions()
                        metrics.registry_versions.set(len(versions))
                        metrics.registry_bytes.set(sum(registry.size(m.version) for m in versions))
                        pruned_for = seen
                    except (OSError, RegistryError) as exc:  # disk space is not worth a round: go on
                        log.warning("cannot prune the registry (%s); trying again later", exc)
                try:
                    poll = poll_once(cfg, files, registry, store, rollout, state, stop, follower, metrics, still_mine)
                except Stopped:
                    log.info("stopped: the interrupted round is redone at the next start")
                    return 0
                except LostLease as exc:
                    log.error("%s (the trainer that holds it now trains that feedback): stopping", exc)
                    return 1
                # Not the same line on every new event while a canary is judged, and a count of the
                # feedback so far (it changes with every thumb) once a minute at most.
                if poll.pending is not None:  # before the log line says it
                    metrics.pending.set(poll.pending)
                quiet = poll.progress and said_progress and time.monotonic() - said_at < 60
                if poll.message != said and not quiet:
                    log.info("%s", poll.message)
                    said_progress, said_at = poll.progress, time.monotonic()
                state, looked_at, said = poll.state, now, poll.message
                if poll.status == "holding":  # time, not the log, ends this wait: look again
                    looked_at = ()
                if cfg.once:
                    return 1 if poll.status == "skipped" else 0
                if poll.status != "ran":  # a look every poll_s at most, however busy the log is
                    stop.wait(cfg.poll_s)
        finally:
            rollouts.close()
            store.close()
            shutil.rmtree(files.work, ignore_errors=True)
    log.info("stopped")
    return 0
