"""One trainer round, its machine-learning part: the log's data split by caller, the reward model
(warm-started from the last round's), PPO-ptx from the stable policy against it, the evaluation,
and the gate. The stages take the round's data in memory and return typed results; the round
writes only in its work folder (the stages' run folders); publishing and the trainer's state
belong to ``training/trainer.py``.

    data -> reward model (+ held-out accuracy of the new and the previous RM) -> PPO-ptx
    -> evaluate (win rate against stable, judged by the round's RM) -> gate checks

When the new reward model fails its checks the round ends before PPO, unless the previous one
passes a first reward model's floors on this round's held-out data and ranks them at least as
well: then the previous one is the round's RM for PPO, the win rate and the gate
(``rm_fallback``), and the new one is not kept.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heed.callers import capped_total
from heed.eventlog import CompletionRecord, EventStore, LogFollower, held_out, read_after
from training import runtime, threads
from training.builders import DEFAULT_SCORE_KEYS, EventLogData, build_from_event_log, parse_score_keys
from training.config import TrainerConfig
from training.data import Demonstration, Prompt, read_texts, seeded_sample
from training.evaluate import RM_CHECKS, Check, gate, heldout_metrics, rm_checks, win_rate
from training.reward import Example, Heldout

if TYPE_CHECKING:
    from training.ppo import PPOIteration

log = logging.getLogger(__name__)


class Stopped(Exception):
    """A stop was requested (SIGTERM/SIGINT): the round is abandoned between two stages."""


# ---- data ----------------------------------------------------------------------------------------


def _signal_weights(cfg: TrainerConfig) -> dict[str, float]:
    """What one piece of feedback of each kind a caller sends counts towards the round threshold."""
    return {
        "rankings": 1.0, "thumbs": cfg.thumb_signal, "ratings": cfg.rating_signal,
        "corrections": cfg.correction_signal,
    }  # fmt: skip


@dataclass
class RoundData:
    """The log up to ``watermark``, split by caller into training and held-out data."""

    train: EventLogData
    heldout: EventLogData
    watermark: int
    callers: dict[str, bool] = field(default_factory=dict)  # caller -> held out

    def feedback(self, cfg: TrainerConfig) -> float:
        """What the round threshold counts, over both parts: the reward model's examples, each
        comparison 1 (rankings, thumb and rating pairs), each thumb, rating and correction its
        weight in ``cfg`` (thumb_signal, rating_signal, correction_signal)."""
        weight = _signal_weights(cfg)
        return sum(
            weight["rankings"] * len(d.comparisons) + len(d.pairs) + len(d.rating_pairs)
            + weight["thumbs"] * len(d.judged) + weight["ratings"] * len(d.ratings)
            + weight["corrections"] * len(d.corrections)
            for d in (self.train, self.heldout)
        )  # fmt: skip

    def counted(self, cfg: TrainerConfig) -> float:
        """What counts towards the round threshold: ``feedback``, with no caller above
        ``cfg.max_caller_share`` of it. A caller's part is what they sent themselves (each ranking
        1, each thumb, rating and correction its weight); the pairs that callers' thumbs and
        ratings make together count in the same proportion as the feedback they came from."""
        weight = _signal_weights(cfg)
        sent: defaultdict[str, float] = defaultdict(float)  # caller -> their own feedback, weighed
        for part in (self.train, self.heldout):
            for (kind, caller), n in part.sent.items():
                sent[caller] += weight[kind] * n
        raw = sum(sent.values())
        return self.feedback(cfg) * capped_total(sent.values(), cfg.max_caller_share) / raw if raw else 0.0

    def callers_sending(self) -> int:
        """How many callers sent feedback that counts."""
        return len({caller for part in (self.train, self.heldout) for _, caller in part.sent})

    def counts(self, cfg: TrainerConfig) -> dict[str, Any]:
        return {
            "feedback_total": round(self.feedback(cfg), 3),
            **self.train.counts(),
            **{f"heldout_{k}": v for k, v in self.heldout.counts().items()},
            "training_callers": sum(not h for h in self.callers.values()),
            "heldout_callers": sum(self.callers.values()),
        }


def build_round_data(
    store: EventStore,
    watermark: int,
    heldout_fraction: float,
    max_per_caller: int = 0,
    follower: LogFollower | None = None,
    score_keys: tuple[str, ...] = DEFAULT_SCORE_KEYS,
    since: int = 0,
    max_caller_share: float = 1.0,
) -> RoundData:
    """Everything derivable from the whole log up to ``watermark``: the same events, the same data
    (at most ``max_per_caller`` examples of each kind from one caller). With a ``follower``, the
    entries it has read (it reads on only what is new) instead of reading the log again. With
    ``since``, only what was logged after that position (what the round threshold counts): only
    those entries are looked at, and the completions before it that their feedback is on are
    fetched together (``get_completions``), so a poll costs what is new, not the whole log. No
    caller gives more than ``max_caller_share`` of any kind on either side (``fair_limit``)."""
    callers: dict[str, bool] = {}

    def is_heldout(caller: str) -> bool:
        callers[caller] = held_out(caller, heldout_fraction)
        return callers[caller]

    if follower is not None:
        entries = follower.between(since, watermark)
    else:  # read once
        entries = list(itertools.takewhile(lambda e: e.seq <= watermark, read_after(store, since)))
    # The earlier completions the feedback is on (logged before it, not among the entries),
    # fetched together once for both sides.
    logged: set[str] = set()
    earlier: set[str] = set()
    for entry in entries:
        if isinstance(entry.record, CompletionRecord):
            logged.add(entry.record.completion_id)
        elif entry.record.completion_id not in logged:
            earlier.add(entry.record.completion_id)
    find = store.get_completions(earlier).get
    common: dict[str, Any] = {
        "until": watermark,
        "entries": entries,
        "max_per_caller": max_per_caller,
        "score_keys": parse_score_keys(score_keys),
        "max_caller_share": max_caller_share,
        "find_completion": find,
    }
    train = build_from_event_log(store, since, callers=lambda c: not is_heldout(c), **common)
    heldout = build_from_event_log(store, since, callers=is_heldout, **common)
    return RoundData(train, heldout, watermark, callers)


def reward_examples(data: EventLogData, limit: int, seed: int) -> list[Example]:
    """The reward model's examples of ``data``: of each kind (comparisons, thumbs, ratings) a
    seeded sample of ``limit`` at most (0: all)."""
    return [
        *seeded_sample(data.ranked(), limit, seed),
        *seeded_sample(data.judged, limit, seed),
        *seeded_sample(data.ratings, limit, seed),
    ]


@dataclass(frozen=True)
class PPOInputs:
    """What a round's PPO trains on: its prompts, the ptx mix's texts and demonstrations, and the
    ptx coefficient (0 when the mix is empty)."""

    prompts: Sequence[Prompt]
    texts: list[str]
    demonstrations: list[Demonstration]
    ptx: float  # PPO-ptx's coefficient


def ppo_inputs(cfg: TrainerConfig, train: EventLogData, seed: int) -> PPOInputs:
    """A round's PPO inputs from its training data: a seeded sample of the prompts, and for PPO-ptx
    the pretraining text given (``ptx_data``), else the logged answers, and the corrections."""
    prompts = seeded_sample(list(train.prompts), cfg.ppo_max_examples, seed)
    if cfg.ppo.ptx_coef <= 0:
        return PPOInputs(prompts, [], [], 0.0)
    texts = read_texts(cfg.ptx_data) if cfg.ptx_data is not None else list(train.texts)
    demos = list(train.demonstrations) if cfg.ppo.ptx_demo_share > 0 else []
    texts, demos = seeded_sample(texts, cfg.ppo_max_examples, seed), seeded_sample(demos, cfg.ppo_max_examples, seed)
    return PPOInputs(prompts, texts, demos, cfg.ppo.ptx_coef if texts or demos else 0.0)


# ---- the round -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterStart:
    """In adapter mode, what a round's PPO trains: a LoRA adapter on the full version ``base``
    (folder ``base_dir``), warm-started from the stable version's adapter (``stable_adapter``; None
    when the stable version is the base itself, and the round makes the first adapter)."""

    base: str
    base_dir: Path
    stable_adapter: Path | None = None


@dataclass
class RoundResult:
    """What a round produced (in its work folder) and how it was judged."""

    reward_model: Path
    candidate: Path | None  # None: the reward model failed its checks, and PPO did not run
    checks: list[Check]
    stages: dict[str, dict[str, Any]]  # per stage: seconds, peak RSS, metrics
    evaluation: dict[str, Any]  # for the registry manifest
    candidate_adapter: Path | None = None  # adapter mode: the candidate as an adapter on ``base``
    base: str | None = None
    # Why the new reward model failed, when PPO, the win rate and ``checks`` used the previous one.
    fell_back: str | None = None

    @property
    def reward_model_passed(self) -> bool:
        """Whether the round's new reward model passed its checks (and the next round builds on it)."""
        return self.fell_back is None and all(c.passed for c in self.checks if c.name in RM_CHECKS)


@contextlib.contextmanager
def _stage(stages: dict[str, dict[str, Any]], name: str, stop: threading.Event) -> Iterator[dict[str, Any]]:
    """Time a stage and record the peak RSS after it, and, when the trainer follows the free cores,
    the seconds it spent at each torch thread count; a requested stop ends the round before it."""
    if stop.is_set():
        raise Stopped
    record: dict[str, Any] = {}
    start, before = time.perf_counter(), threads.thread_seconds()
    yield record
    stages[name] = {**record, "seconds": round(time.perf_counter() - start, 2), "peak_rss_gib": _rss()}
    after = threads.thread_seconds()
    if before is not None and after is not None:
        spent = {str(n): round(t - before.get(n, 0.0), 1) for n, t in sorted(after.items())}
        stages[name]["torch_threads_s"] = {n: t for n, t in spent.items() if t > 0}


def _rss() -> float:
    return round(runtime.peak_rss_gib(), 3)


def train_round(
    cfg: TrainerConfig,
    data: RoundData,
    work: Path,
    stable_dir: Path,
    previous_rm: Path | None,
    round_: int,
    stop: threading.Event,
    adapter: AdapterStart | None = None,
) -> RoundResult:
    """Reward model, PPO-ptx, evaluation and gate of round ``round_`` on ``data``, in ``work``.
    ``stable_dir``: the stable version's full model (the reward model's body, PPO's KL reference,
    the win rate's baseline); with ``adapter``, PPO trains an adapter on its base instead."""
    from training.ppo import train_ppo
    from training.reward import train_reward_model

    seed = cfg.seed + round_ - 1
    stages: dict[str, dict[str, Any]] = {}
    stable_name = stable_dir.name  # the version's folder in the registry
    if adapter is not None and adapter.stable_adapter is not None:
        with _stage(stages, "merge", stop) as record:  # the stable model whole: the RM's body, the reference
            stable_dir = runtime.merge_adapter(adapter.base_dir, adapter.stable_adapter, work / "stable")
            record.update(adapter=str(adapter.stable_adapter), base=adapter.base)

    with _stage(stages, "data", stop) as record:
        train = reward_examples(data.train, cfg.rm_max_examples, seed)
        heldout = reward_examples(data.heldout, cfg.heldout_max_examples, seed)
        inputs = ppo_inputs(cfg, data.train, seed)
        if cfg.ppo.ptx_coef > 0 and inputs.ptx == 0:
            log.warning("round %d: no logged answers or corrections to use as the ptx mix: plain PPO", round_)
        record.update(
            train_examples=len(train),
            heldout_examples=len(heldout),
            ptx_data=str(cfg.ptx_data) if cfg.ptx_data else "logged answers",
            ppo_prompts=len(inputs.prompts),
            ptx_texts=len(inputs.texts),
            ptx_demonstrations=len(inputs.demonstrations),
        )
    log.info(
        "round %d: data: %d training examples, %d held-out, %d prompts (%s)",
        round_, len(train), len(heldout), len(data.train.prompts), data.counts(cfg),
    )  # fmt: skip

    with _stage(stages, "reward_model", stop) as record:
        body = (
            f"the first {cfg.rm.layers} layers (or all, if fewer) of the stable policy's body"
            if cfg.rm.layers
            else "the stable policy's body"
        )
        start = f"warm start from {previous_rm}" if previous_rm else f"a new head on {body}"
        log.info("round %d: reward model on %d examples, %s", round_, len(train), start)
        rm_cfg = replace(cfg.rm, model=str(stable_dir), init=previous_rm, out=work / "rm", seed=seed, device=cfg.device)
        # Judged on the held-out comparisons once, at the end (the trainer's eval_every); the
        # previous reward model is judged the same way on the same comparisons.
        # The offset's reference (the demonstrations' mean score 0): a sample as large as a kind's.
        reference = seeded_sample(list(data.train.demonstrations), cfg.rm_max_examples, seed) or None
        rm = train_reward_model(rm_cfg, train, valid=heldout, reference=reference)
        old = (
            heldout_metrics(previous_rm, heldout, cfg.rm.max_length, cfg.rm.batch_size, cfg.device)
            if previous_rm
            else None
        )
        record.update(
            start=start,
            last_step=rm.steps[-1].row() if rm.steps else None,
            heldout=asdict(rm.heldout) if rm.heldout else None,
            previous_heldout=asdict(old) if old else None,
        )
    accuracy = rm.heldout.accuracy if rm.heldout else None
    previous_accuracy = old.accuracy if old else None
    log.info(
        "round %d: reward model held-out: %s (previous reward model: %s)",
        round_, _heldout_line(rm.heldout), _heldout_line(old),
    )  # fmt: skip
    evaluation: dict[str, Any] = {
        "round": round_,
        "rm_heldout_accuracy": accuracy,
        "rm_previous_heldout_accuracy": previous_accuracy,
        "rm_heldout_comparisons": rm.heldout.comparisons if rm.heldout else 0,
        "rm_heldout": asdict(rm.heldout) if rm.heldout else None,
    }
    checks = rm_checks(rm.heldout, old, cfg)
    stages["reward_model"]["checks"] = [c.to_json() for c in checks]
    judge, judge_heldout, judge_previous = rm.model, rm.heldout, old  # PPO's reward model, and how it is gated
    fell_back: str | None = None
    if not all(c.passed for c in checks):  # PPO against it would be rejected
        for c in checks:
            log.info("round %d: gate: %s%s", round_, c, "" if c.passed else "; no PPO against this reward model")
        # The previous reward model, judged on this round's held-out data, may still be good
        # enough: a round lost to a worse new reward model is a round of feedback wasted
        # (seen: two of four rounds of one run, the previous scoring 66.8% and 71.1% on them).
        # It must pass a first reward model's floors there, and rank at least as well as the new one.
        usable = (
            cfg.rm_fallback
            and old is not None
            and all(c.passed for c in rm_checks(old, None, cfg))
            and (accuracy is None or (previous_accuracy is not None and previous_accuracy >= accuracy))
        )
        if previous_rm is None or not usable:
            return RoundResult(rm.model, None, checks, stages, {**evaluation, "gate": [c.to_json() for c in checks]})
        log.info("round %d: PPO against the previous reward model, which passes on this round's held-out data", round_)
        # The version's evaluation is the reward model's that judged it; the new one's failed checks beside it.
        evaluation |= {
            "rm_heldout_accuracy": previous_accuracy,
            "rm_heldout": asdict(old) if old else None,
            "rm_gate": stages["reward_model"]["checks"],
        }
        judge, judge_heldout, judge_previous = previous_rm, old, None
        fell_back = "; ".join(c.reason() for c in checks if not c.passed)
        stages["reward_model"]["fallback"] = str(previous_rm)

    with _stage(stages, "ppo", stop) as record:
        log.info(
            "round %d: PPO-ptx from %s: %d iterations of %d episodes, beta %g, ptx gamma %g (%d corrections mixed)",
            round_, stable_name, cfg.ppo.iterations, cfg.ppo.episodes, cfg.ppo.kl_coef, inputs.ptx,
            len(inputs.demonstrations),
        )  # fmt: skip
        ppo_cfg = replace(
            cfg.ppo,
            policy=str(stable_dir),
            reward_model=judge,
            out=work / "ppo",
            stop_kl=cfg.max_kl,  # a policy past the gate's bound would be rejected: stop before it
            ptx_coef=inputs.ptx,
            seed=seed,
            save_every=cfg.ppo.iterations,
            device=cfg.device,
        )
        if adapter is not None:  # the stable model is the base with the stable adapter: train that adapter on
            ppo_cfg = replace(
                ppo_cfg,
                policy=str(adapter.base_dir),
                init_adapter=adapter.stable_adapter,
                lora_r=0 if adapter.stable_adapter else max(1, cfg.adapter_rank),
                lr=cfg.adapter_lr,
            )
            record.update(adapter_on=adapter.base, adapter_from=str(adapter.stable_adapter or "a new adapter"))
        ppo = train_ppo(ppo_cfg, inputs.prompts, inputs.texts, demonstrations=inputs.demonstrations)
        iterations = ppo.iterations
        window = iterations[-max(1, cfg.kl_window) :]
        kl = sum(i.kl for i in window) / len(window)
        record.update(
            kl=kl,
            kl_iterations=len(window),
            iterations=len(iterations),
            first=_summary(iterations[0]),
            last=_summary(iterations[-1]),
        )
    log.info(
        "round %d: PPO done: %d iterations, reward %.3f -> %.3f, KL %.3f",
        round_, len(iterations), iterations[0].reward, iterations[-1].reward, kl,
    )  # fmt: skip

    with _stage(stages, "evaluate", stop) as record:
        pool = list(data.heldout.prompts or data.train.prompts)
        random.Random(seed).shuffle(pool)
        prompts = [pool[i % len(pool)] for i in range(cfg.eval_prompts)]
        log.info("round %d: win rate of the candidate against %s on %d prompts", round_, stable_name, len(prompts))
        wins = win_rate(
            ppo.model,
            stable_dir,
            judge,
            prompts,
            max_new_tokens=cfg.ppo.max_new_tokens,
            temperature=cfg.ppo.temperature,
            seed=seed,
            max_length=cfg.rm.max_length,  # scored as the reward model was trained: the last tokens
            device=cfg.device,
        )
        record.update(wins.to_json(), prompts_from="held-out callers" if data.heldout.prompts else "training callers")

    entropy = (iterations[0].entropy, iterations[-1].entropy)
    checks = gate(judge_heldout, judge_previous, wins.win_rate, kl, cfg, entropy)
    for c in checks:
        log.info("round %d: gate: %s", round_, c)
    evaluation |= {
        "win_rate": wins.win_rate,
        "win_rate_against": stable_name,
        "win_rate_prompts": wins.prompts,
        "judge": "the round's reward model" if fell_back is None else f"the previous reward model ({judge.name})",
        "kl": kl,
        "gate": [c.to_json() for c in checks],
    }
    if adapter is not None:
        if ppo.adapter is None:
            raise RuntimeError("adapter mode: PPO saved no adapter (--adapter-rank must be at least 1)")
        return RoundResult(rm.model, ppo.model, checks, stages, evaluation, ppo.adapter, adapter.base, fell_back)
    return RoundResult(rm.model, ppo.model, checks, stages, evaluation, fell_back=fell_back)


# What a round's report shows of a PPO iteration (its first and its last).
SUMMARY = ("reward", "kl", "kl_coef", "entropy", "clipfrac", "value_loss", "ptx_loss", "response_length")


def _summary(iteration: PPOIteration) -> dict[str, float]:
    return {k: v for k in SUMMARY if (v := getattr(iteration, k)) is not None}


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _heldout_line(heldout: Heldout | None) -> str:
    if heldout is None:
        return "none"
    return (
        f"accuracy {_fmt(heldout.accuracy)} on {heldout.comparisons} comparisons, thumbs AUC"
        f" {_fmt(heldout.thumbs_auc)} and ECE {_fmt(heldout.thumbs_ece)} on {heldout.thumbs}, ratings Spearman"
        f" {_fmt(heldout.ratings_spearman)} on {heldout.ratings}, corrections {_fmt(heldout.correction_accuracy)}"
        f" on {heldout.corrections}"
    )
