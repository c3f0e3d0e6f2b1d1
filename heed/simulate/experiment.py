"""`heed simulate`: the paper's evaluation in miniature, end to end through the public APIs.

start `heed serve --with-trainer` -> the start policy answers the evaluation prompts ->
training-group users give feedback while the trainer runs rounds and the controller canaries
and promotes -> the final stable policy answers the same prompts -> held-out labelers (who gave
no feedback) judge final against start, side by side -> report: win rate with its 95% interval,
the reward model's held-out metrics and KL per round, instruction following before and after,
and (with --tax-text) the alignment tax.

Two populations (``--feedback``):
- ``labelers``: the paper's labelers: most requests ask for K answers and rank them, the rest
  get a thumb;
- ``app``: an app's users: every prompt asked once (from a space of prompt_space() distinct
  prompts; the run counts repeats), one answer per request, a thumb on about half of them, a 1-7
  rating on about a tenth, a written correction on about one in twenty, no rankings.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from heed.config import option
from heed.datadir import DataDir
from heed.eventlog import held_out
from heed.launcher import ServeSpec, launch_server
from heed.registry import PolicyMode
from heed.rollout import PIN_HEADER
from heed.simulate.instructions import (
    DEFAULT_KINDS,
    KINDS,
    Task,
    check_kinds,
    make_tasks,
    prompt_space,
    write_answer,
)
from heed.simulate.labelers import ExtraCheck, Labeler, population
from heed.trainer_files import TrainerFiles, TrainerState

if TYPE_CHECKING:
    from training.config import TrainerConfig

log = logging.getLogger(__name__)
TaskSource = Callable[[int, int], list[Task]]  # (count, seed) -> tasks

# The trainer's settings for this experiment, unless the environment sets HEED_TRAINER_* itself:
# rounds sized for the 135M model on 2 cores (a round in about 15 minutes while the users pause).
TRAINER_DEFAULTS = {
    "HEED_TRAINER_POLL_S": "5",
    # Instruction prompts rarely repeat, so thumbs seldom pair up: rankings (K answers) are the
    # comparisons. Offline, 450 rankings of 4 taught the 135M reward model 0.78 held-out accuracy
    # in 56 steps at lr 1e-4 (against about 0.87 for the labelers' own noise-free taste).
    "HEED_TRAINER_MIN_NEW_FEEDBACK": "250",
    # The reward model (warm-started after round 1) trains on a seeded sample of each kind, not on
    # the whole log: with every example its stage grew with the log (4.0, 9.0, 11.2 minutes in one
    # run; docs/results.md, "The defaults with the reward model on a sample"). 256 of each, not the
    # trainer's 128: with 128 the last reward models of two of four runs had lost the preference
    # for answers that carry the prompt's required word, and PPO dropped the word; offline on one
    # run's log, 256 judged better and kept it, at about 1.8x the stage's time (docs/benchmarks.md,
    # "The reward model's sample").
    "HEED_TRAINER_RM_MAX_EXAMPLES": "256",
    "HEED_TRAINER_RM_EPOCHS": "1",
    "HEED_TRAINER_RM_BATCH_SIZE": "8",
    "HEED_TRAINER_RM_LR": "1e-4",
    "HEED_TRAINER_RM_MAX_LENGTH": "160",
    # A new reward model on the body's first 15 of the 135M's 30 layers (a body with fewer keeps
    # all): it trains in half the time, and PPO's scoring and value model cost less. On two logged
    # runs' round 1 it judged within 0.6 points of the whole body in three of four seeds, 8 worse
    # in one (docs/benchmarks.md, "The reward model on the body's first layers"). Under the no-bf16
    # emulation a round took 10-14.5 minutes against 20-21.5 with the whole body, and three rounds
    # fitted the window: two promoted, 78.0% [74.2, 81.7] held-out (docs/results.md, "A sixth
    # emulated no-bf16 run"); in a second run two promoted, 69.0% [64.8, 73.3]; in a third three, 76.3%.
    "HEED_TRAINER_RM_LAYERS": "15",
    # Offline, 10 iterations at 2e-5 against that reward model took max_words from 19% to 81% and
    # won 66% [58, 73] with held-out labelers (64 prompts); about 18 s an iteration alone.
    "HEED_TRAINER_PPO_ITERATIONS": "12",
    "HEED_TRAINER_PPO_EPISODES": "16",
    "HEED_TRAINER_PPO_MINIBATCH_SIZE": "8",
    "HEED_TRAINER_PPO_LR": "2e-5",
    # --policy-mode adapter: the LoRA adapter's (r 8), 10x full fine-tuning's, the ratio at which the
    # tiny model's LoRA rounds moved the policy about as far as full ones (tests/word_lists.py).
    "HEED_TRAINER_ADAPTER_LR": "2e-4",
    "HEED_TRAINER_MAX_NEW_TOKENS": "48",
    "HEED_TRAINER_EVAL_PROMPTS": "48",
    "HEED_TRAINER_MIN_WIN_RATE": "0.55",
    "HEED_TRAINER_MIN_RM_ACCURACY": "0.65",
    "HEED_TRAINER_NICE": "5",
    # Every version stays: the run's folder is its record, and bench/judge_app_run.py judges any.
    "HEED_TRAINER_KEEP_VERSIONS": "0",
}
# What the app population changes: its thumbs, ratings and corrections are the reward model's
# data (no rankings), judged on held-out thumbs (the ranking accuracy has nothing to measure).
APP_TRAINER_DEFAULTS = {
    # A thumb counts 0.5 and a rating or correction 1: about 480 answers with feedback (900
    # requests). In a first run at 200, round 1's reward model (270 examples) reached a held-out
    # thumbs AUC of only 0.57.
    "HEED_TRAINER_MIN_NEW_FEEDBACK": "350",
    # One answer per example (a ranking has four): two passes, 16 answers a step (at 8, 4.2 s a
    # step: the optimizer's step over 135M parameters weighs more than the answers).
    "HEED_TRAINER_RM_EPOCHS": "2",
    "HEED_TRAINER_RM_BATCH_SIZE": "16",
    # Every example: 128 thumbs a round would be a third of round 1's (not tried in app mode).
    "HEED_TRAINER_RM_MAX_EXAMPLES": "0",
    "HEED_TRAINER_MIN_THUMBS_AUC": "0.6",
}
FeedbackMode = Literal["labelers", "app"]


@dataclass(frozen=True)
class SimulateConfig:
    model: str = option("", "the policy to start from (default: the bundled SmolLM2-135M-Instruct)")
    out: Path = option(Path("simulate-run"), "output folder: data/, results.json, results.md, plots")
    minutes: float = option(50.0, "length of the feedback phase, in minutes")
    promotions: int = option(0, "end the feedback phase early after this many promotions (0: use all the time)")
    kinds: str = option(
        ",".join(DEFAULT_KINDS), f"the prompts' instruction kinds, comma-separated (of: {', '.join(KINDS)})"
    )
    train_labelers: int = option(12, "labelers who use the service and give the feedback")
    sessions: int = option(
        8, "caller ids (`user`) per training labeler: the trainer holds out callers, so more ids steady its split"
    )
    heldout_labelers: int = option(6, "labelers who only judge the final policy against the start")
    workers: int = option(4, "concurrent simulated users (vLLM batches them: 4 gave more answers a minute than 2)")
    feedback: FeedbackMode = option(
        "labelers",
        "who gives the feedback: 'labelers' (K answers ranked, or a thumb) or 'app' (an app's users: every prompt"
        " unique, one answer, thumbs on about half, ratings on a tenth, corrections on a twentieth, no rankings)",
    )
    rank_share: float = option(
        0.8, "labelers: share of requests that ask for K answers and rank them (the rest: a thumb)"
    )
    thumb_share: float = option(0.5, "app: share of answers that get a thumb")
    rating_share: float = option(0.1, "app: share of answers that get a 1-7 rating")
    correction_share: float = option(0.05, "app: share of answers that get a written correction")
    k: int = option(4, "answers per ranking request")
    max_tokens: int = option(48, "answer tokens at most")
    temperature: float = option(1.0, "sampling temperature while collecting feedback")
    eval_prompts: int = option(200, "evaluation prompts (one answer from each policy each)")
    eval_temperature: float = option(0.7, "sampling temperature of the evaluation answers")
    seed: int = option(0, "seed of the prompts, the labelers and their noise")
    pause_s: float = option(0.2, "a user's pause between requests")
    pause_during_rounds: bool = option(
        True, "users wait while the trainer runs a round and no canary is live (2 cores: serving slows training 4x)"
    )
    canary_thumbs: bool = option(True, "while a canary is live, users give thumbs only: the controller's evidence")
    eval_concurrency: int = option(4, "evaluation requests in flight at once")
    enforce_eager: bool = option(False, "start vLLM without torch.compile (faster start, slower answers)")
    policy_mode: PolicyMode = option(
        "full",
        "the server's --policy-mode: full (whole models, an engine per slot) or adapter (LoRA adapters, one engine)",
    )
    canary_steps: str = option("50,100", "the rollout's canary shares (percent)")
    min_feedback_per_step: int = option(40, "canary thumbs per step before the controller judges")
    max_canary_minutes: float = option(
        15.0,
        "a canary step still undecided after this long is rolled back, and the next round trains (the server's"
        " --max-canary-hours; its own default, a day, would let one canary no better than stable end the run's"
        " rounds: seen on a host that trains in fp32, 2026-12-06)",
    )
    # 20, not 10: where the trainer computes in fp32 a round takes 13-20 minutes from its threshold to
    # its canary, and in emulated no-bf16 runs a third round started 45-50 minutes in was still
    # training when 10 minutes ran out; those runs' two promoted rounds won 65-69% held out, the runs
    # whose third round was promoted 75-76% (docs/results.md).
    settle_minutes: float = option(
        20.0,
        "after the feedback phase, wait this long at most for a round in progress and its canary"
        " (users give the canary thumbs; no new round starts)",
    )
    compare_kto: bool = option(
        False, "after the run, train KTO from the start policy on the same feedback and judge it (heed/simulate/kto.py)"
    )
    kto_lr: float = option(1e-5, "--compare-kto: KTO's learning rate")
    kto_epochs: int = option(2, "--compare-kto: KTO's passes over the feedback")
    kto_beta: float = option(0.1, "--compare-kto: KTO's beta")
    tax_text: Path | None = option(None, "plain-text JSONL ({'text': ...} or strings) to measure the alignment tax on")
    tax_iterations: int = option(4, "PPO iterations of each alignment-tax run (ptx > 0 and ptx = 0)")

    def kind_list(self) -> list[str]:
        """--kinds as a checked list (ValueError naming unknown kinds)."""
        return check_kinds([k.strip() for k in self.kinds.split(",") if k.strip()])

    def data(self) -> DataDir:
        """The served data directory: ``out/data``."""
        return DataDir(self.out / "data")


@dataclass
class Phase:
    """What the feedback phase did."""

    requests: int = 0
    failures: int = 0
    thumbs: int = 0
    rankings: int = 0
    ratings: int = 0
    corrections: int = 0
    prompts: Counter[str] = field(default_factory=Counter)  # prompt -> times asked
    utility: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # version -> utilities

    def add(self, task: Task, given: Given) -> None:
        self.requests += 1
        self.prompts[task.prompt] += 1
        self.thumbs += given.thumbs
        self.rankings += given.rankings
        self.ratings += given.ratings
        self.corrections += given.corrections
        self.utility[given.version].extend(given.utilities)


class UniqueTasks:
    """Tasks whose prompts this run has not asked before (nor evaluates on): an app's users each
    ask their own question. Thread-safe; RuntimeError when the space runs out."""

    def __init__(self, tasks: TaskSource, seed: int, exclude: Iterable[str] = (), chunk: int = 500) -> None:
        self._tasks, self._seed, self._chunk = tasks, seed, chunk
        self._seen = set(exclude)
        self._queue: list[Task] = []
        self._batches = 0
        self._lock = threading.Lock()

    def next(self) -> Task:
        with self._lock:
            for _ in range(100 * self._chunk):
                if not self._queue:
                    self._queue = list(reversed(self._tasks(self._chunk, self._seed + 7919 * self._batches)))
                    self._batches += 1
                task = self._queue.pop()
                if task.prompt not in self._seen:
                    self._seen.add(task.prompt)
                    return task
        raise RuntimeError(f"no prompt left that was not asked yet ({len(self._seen)} asked)")


class Status:
    """What the users look at between requests: is a canary live, is the trainer busy, how many
    rounds it finished (polled)."""

    def __init__(
        self, url: str, trainer: TrainerFiles, every_s: float = 2.0, headers: dict[str, str] | None = None
    ) -> None:
        self.canary_live = False
        self.training = False
        self.rounds_done = 0
        self._http = httpx.Client(base_url=url, timeout=60, headers=headers)  # the admin key: reads the rollout
        self._trainer, self._every = trainer, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Status:
        self.refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._http.close()

    def refresh(self) -> None:
        self.canary_live = bool(rollout(self._http)["canary"])
        self.training = self._trainer.round_running()
        self.rounds_done = TrainerState.load(self._trainer.state).round

    def _poll(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.refresh()
            except httpx.HTTPError as exc:
                log.warning("could not read the rollout: %s", exc)


def server_spec(cfg: SimulateConfig, env: dict[str, str]) -> ServeSpec:
    """`heed serve --with-trainer` on the experiment's data directory, open (no API keys; a fresh
    admin key to read the rollout), with a warm canary slot and the experiment's rollout settings;
    the trainer's settings in ``env``."""
    rollout_flags = (
        "--canary-steps", cfg.canary_steps,
        "--min-feedback-per-step", str(cfg.min_feedback_per_step),
        "--max-canary-hours", f"{cfg.max_canary_minutes / 60:.6g}",
    )  # fmt: skip
    return ServeSpec(
        cfg.data().root,
        cfg.out / "server.log",
        model=cfg.model,
        with_trainer=True,
        admin_keys={"simulate": secrets.token_urlsafe(24)},
        enforce_eager=cfg.enforce_eager,
        args=("--policy-mode", cfg.policy_mode, "--canary-slot", "warm", "--registry-poll-s", "2", *rollout_flags),
        env=env,
        append_log=True,
        stop_timeout_s=120,  # the co-located trainer may be mid-round
    )


def rollout(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/admin/rollout")
    response.raise_for_status()
    return response.json()


def answer(
    http: httpx.Client, task: Task, *, n: int, max_tokens: int, temperature: float, user: str, pin: str | None = None
) -> dict:
    body = {
        "model": "heed",
        "messages": [{"role": "user", "content": task.prompt}],
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "user": user,
    }
    response = http.post("/v1/chat/completions", json=body, headers={PIN_HEADER: pin} if pin else None)
    response.raise_for_status()
    return response.json()


def eval_callers(count: int, heldout_fraction: float) -> list[str]:
    """Caller ids the trainer holds out: the evaluation's prompts never become PPO prompts."""
    names = (f"eval-{i}" for i in itertools.count())
    return list(itertools.islice((n for n in names if held_out(n, heldout_fraction)), count))


def sample_answers(
    http: httpx.Client, tasks: list[Task], version: str, cfg: SimulateConfig, callers: list[str]
) -> list[str]:
    """One answer of ``version`` (pinned) per task, for the evaluation, in the tasks' order."""

    def one(i: int) -> str:
        temperature, user = cfg.eval_temperature, callers[i % len(callers)]
        data = answer(http, tasks[i], n=1, max_tokens=cfg.max_tokens, temperature=temperature, user=user, pin=version)
        if data["model"] != version:
            raise RuntimeError(f"asked {version} (pinned), answered by {data['model']}")
        return str(data["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(max(cfg.eval_concurrency, 1)) as pool:
        return list(pool.map(one, range(len(tasks))))


def feedback_phase(
    http_url: str,
    cfg: SimulateConfig,
    labelers: list[Labeler],
    extra: dict[str, ExtraCheck] | None,
    until: float,
    enough: threading.Event,
    tasks: TaskSource,
    status: Status | None = None,
    phase: Phase | None = None,
    canary_only: bool = False,
    unique: UniqueTasks | None = None,
) -> Phase:
    """Training-group labelers use the service until ``until`` (monotonic) or ``enough`` is set
    (counting into ``phase`` when given). With ``status``, they follow cfg.pause_during_rounds
    and cfg.canary_thumbs; with ``canary_only`` too, they wait whenever no canary is live (the
    settle time: a canary gets its thumbs, and no new round gets data). With ``unique``, they
    are an app's users (cfg.feedback "app"): each asks the next prompt nobody asked yet."""
    phase = phase or Phase()
    lock = threading.Lock()
    trainers = [p for p in labelers if p.group == "train"]

    def user(worker: int) -> None:
        rng = random.Random(cfg.seed * 1000 + worker)
        if unique is not None:  # an app's users: each prompt once, whoever asks it
            worker_tasks: Iterable[Task] = iter(unique.next, None)
        else:
            worker_tasks = tasks(4000, cfg.seed * 1000 + 100 + worker)
        with httpx.Client(base_url=http_url, timeout=600) as http:
            for task in worker_tasks:
                while (
                    status and not status.canary_live and (canary_only or (cfg.pause_during_rounds and status.training))
                ):
                    if time.monotonic() > until or enough.wait(2):
                        return
                if time.monotonic() > until or enough.is_set():
                    return
                person = rng.choice(trainers)
                try:
                    if unique is not None:
                        given = app_user(http, cfg, task, person, rng, extra)
                    else:
                        thumbs_only = bool(status and cfg.canary_thumbs and status.canary_live)
                        given = labeler_user(http, cfg, task, person, rng, extra, thumbs_only)
                except httpx.HTTPError as exc:
                    log.warning("a simulated user's request failed: %s", exc)
                    with lock:
                        phase.failures += 1
                    time.sleep(1)
                    continue
                with lock:
                    phase.add(task, given)
                time.sleep(cfg.pause_s)

    threads = [threading.Thread(target=user, args=(w,), daemon=True) for w in range(cfg.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return phase


@dataclass(frozen=True)
class Given:
    """What one simulated user's request gave: the answering version, the user's utility of each
    answer, and the feedback sent."""

    version: str
    utilities: tuple[float, ...]
    thumbs: int = 0
    rankings: int = 0
    ratings: int = 0
    corrections: int = 0


def labeler_user(
    http: httpx.Client,
    cfg: SimulateConfig,
    task: Task,
    person: Labeler,
    rng: random.Random,
    extra: dict[str, ExtraCheck] | None,
    thumbs_only: bool,
) -> Given:
    """One request of a labeler: K answers ranked (cfg.rank_share of the requests, unless
    ``thumbs_only``), else one answer and a thumb."""
    ranking = rng.random() < cfg.rank_share and not thumbs_only
    data = answer(
        http, task, n=cfg.k if ranking else 1, max_tokens=cfg.max_tokens,
        temperature=cfg.temperature, user=f"{person.name}/{rng.randrange(max(cfg.sessions, 1))}",
    )  # fmt: skip
    texts = [c["message"]["content"] for c in data["choices"]]
    order = person.rank(task, texts, rng, extra) if ranking else None
    if order is not None:
        body = {"completion_id": data["id"], "ranking": order}
    else:  # one answer, or K the labeler cannot tell apart: a thumb on the first
        body = {"completion_id": data["id"], "choice_index": 0, "thumb": person.thumb(task, texts[0], rng, extra)}
    http.post("/v1/feedback", json=body).raise_for_status()
    utilities = tuple(person.utility(task, text, extra) for text in texts)
    return Given(data["model"], utilities, thumbs=int(order is None), rankings=int(order is not None))


def app_user(
    http: httpx.Client,
    cfg: SimulateConfig,
    task: Task,
    person: Labeler,
    rng: random.Random,
    extra: dict[str, ExtraCheck] | None,
) -> Given:
    """One request of an app's user: one answer; a thumb (cfg.thumb_share), a 1-7 rating
    (cfg.rating_share) and a written correction (cfg.correction_share, when the user can write an
    answer they like better) each drawn on their own."""
    user = f"{person.name}/{rng.randrange(max(cfg.sessions, 1))}"
    data = answer(http, task, n=1, max_tokens=cfg.max_tokens, temperature=cfg.temperature, user=user)
    text = str(data["choices"][0]["message"]["content"])
    sent = {"thumb": 0, "rating": 0, "correction": 0}
    bodies: list[dict[str, Any]] = []
    if rng.random() < cfg.thumb_share:
        bodies.append({"thumb": person.thumb(task, text, rng, extra)})
    if rng.random() < cfg.rating_share:
        bodies.append({"rating": person.rate(task, text, rng, extra)})
    if rng.random() < cfg.correction_share:
        fix = write_answer(task, rng)
        if fix is not None and person.utility(task, fix, extra) > person.utility(task, text, extra):
            bodies.append({"correction": fix})
    for body in bodies:
        http.post("/v1/feedback", json={"completion_id": data["id"], "choice_index": 0, **body}).raise_for_status()
        sent[next(iter(body))] += 1
    utility = (person.utility(task, text, extra),)
    return Given(data["model"], utility, sent["thumb"], 0, sent["rating"], sent["correction"])


def win_rate(
    tasks: list[Task],
    start: list[str],
    final: list[str],
    judges: list[Labeler],
    seed: int,
    extra: dict[str, ExtraCheck] | None = None,
) -> dict[str, Any]:
    """Every judge compares final against start on every task (ties half). The interval treats
    prompts as the unit (the judges' mean per prompt), at 95%."""
    rng = random.Random(seed)
    per_prompt = [
        sum(j.compare(t, f, s, rng, extra) for j in judges) / len(judges)
        for t, s, f in zip(tasks, start, final, strict=True)
    ]
    n = len(per_prompt)
    mean = sum(per_prompt) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"win_rate": mean, "low": mean - half, "high": mean + half, "prompts": n, "judges": len(judges)}


def following(tasks: list[Task], answers: list[str]) -> dict[str, float]:
    """The share of each instruction kind's instances that the answers follow."""
    seen, kept = Counter[str](), Counter[str]()
    for task, text in zip(tasks, answers, strict=True):
        for kind, ok in task.followed(text).items():
            seen[kind] += 1
            kept[kind] += ok
    return {kind: kept[kind] / seen[kind] for kind in sorted(seen)}


def run(
    cfg: SimulateConfig,
    extra: dict[str, ExtraCheck] | None = None,
    labelers: list[Labeler] | None = None,
    tasks: TaskSource | None = None,
) -> dict[str, Any]:
    """The whole experiment; writes ``cfg.out``/results.json and returns the results. ``extra``
    adds checks beyond the prompts' instructions to the labelers' utility; ``labelers`` replaces
    the default population; ``tasks(count, seed)`` replaces the instruction prompts."""
    kinds = cfg.kind_list()
    custom_tasks = tasks
    if tasks is None:

        def tasks(count: int, seed: int) -> list[Task]:
            return make_tasks(count, seed, kinds)

    cfg.out.mkdir(parents=True, exist_ok=True)
    env = trainer_settings(cfg.feedback)
    if cfg.tax_text is not None and "HEED_TRAINER_PTX_DATA" not in os.environ:
        # The trainer's PPO-ptx mixes in the first half of that text; the tax is measured on the rest.
        from heed.simulate.tax import split
        from training.data import read_texts, write_jsonl

        mix = cfg.out / "ptx-mix.jsonl"
        write_jsonl(mix, [{"text": t} for t in split(read_texts(cfg.tax_text))[0]])
        env["HEED_TRAINER_PTX_DATA"] = str(mix)
    labelers = labelers or population(cfg.train_labelers, cfg.heldout_labelers, cfg.seed, kinds)
    heldout = [p for p in labelers if p.group == "heldout"]
    trainers = [p for p in labelers if p.group == "train"]
    eval_tasks = tasks(cfg.eval_prompts, cfg.seed + 7)
    unique = (
        UniqueTasks(tasks, cfg.seed * 1000 + 100, {t.prompt for t in eval_tasks}) if cfg.feedback == "app" else None
    )
    callers = eval_callers(16, trainer_config(env).heldout_fraction)
    files = TrainerFiles.of(cfg.data().root)
    started = time.time()
    with (
        launch_server(server_spec(cfg, env)) as server,
        httpx.Client(base_url=server.http_url, timeout=600, headers=server.admin_headers()) as http,
        Status(server.http_url, files, headers=server.admin_headers()) as status,
    ):
        url = server.http_url
        if cfg.policy_mode == "full":
            # A service that has run a while has its canary slot warm before a round: warming it
            # (an engine start and its compilation, a minute of a core) would otherwise fall in
            # round 1's reward model, the first time the users pause.
            log.info("the canary slot was warm %.0f s after the server was ready", server.wait_for_warm_canary())
        start_version = rollout(http)["stable"]
        log.info(
            "the start policy is %s; sampling its answers to %d evaluation prompts", start_version, len(eval_tasks)
        )
        start_answers = sample_answers(http, eval_tasks, start_version, cfg, callers)

        log.info("feedback phase: %d training labelers for %.0f minutes", len(trainers), cfg.minutes)
        enough = threading.Event()
        until = time.monotonic() + cfg.minutes * 60

        def watch() -> None:  # end early once enough versions were promoted
            with httpx.Client(base_url=url, timeout=60, headers=server.admin_headers()) as watcher:
                while time.monotonic() < until and not enough.is_set():
                    state = rollout(watcher)
                    promoted = sum(d["action"] == "promoted" for d in state["history"])
                    if cfg.promotions and promoted >= cfg.promotions and not state["canary"]:
                        enough.set()
                    time.sleep(5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        phase = feedback_phase(url, cfg, labelers, extra, until, enough, tasks, status, unique=unique)
        enough.set()
        state = rollout(http)
        busy = bool(state["canary"]) or status.training
        if busy and cfg.settle_minutes > 0:  # let the round end and the controller decide on its version
            what = f"a canary ({state['canary']}) is being judged" if state["canary"] else "a round is training"
            log.info("%s: up to %.0f more minutes", what, cfg.settle_minutes)
            settled, settle_until = threading.Event(), time.monotonic() + cfg.settle_minutes * 60

            rounds_before = status.rounds_done if status.training else -1  # the round in progress

            def settle() -> None:
                # Until that round is done and no canary is live, two looks in a row (publish ->
                # canary takes a registry poll); later rounds, on the canary's thumbs, are not waited for.
                quiet = 0
                while not settled.is_set() and time.monotonic() < settle_until:
                    done = status.rounds_done > rounds_before
                    quiet = quiet + 1 if done and not status.canary_live else 0
                    if quiet >= 2:
                        settled.set()
                    time.sleep(5)

            threading.Thread(target=settle, daemon=True).start()
            feedback_phase(
                url, cfg, labelers, extra, settle_until, settled, tasks, status, phase, canary_only=True, unique=unique
            )
            settled.set()
            state = rollout(http)
        if state["canary"]:  # judged apart below: held where it is, so its time limit cannot roll it back meanwhile
            paused = http.post("/admin/rollout/pause", json={})
            if paused.status_code != 200:
                log.warning("could not pause the canary %s: %s", state["canary"], paused.text[:300])
            state = rollout(http)
        final_version, candidate = state["stable"], state["canary"]
        log.info("feedback phase done: %d requests; stable is %s", phase.requests, final_version)
        final_answers = (
            sample_answers(http, eval_tasks, final_version, cfg, callers)
            if final_version != start_version
            else start_answers
        )
        # A canary still undecided is judged too, apart: what the trainer made, whatever the rollout said.
        candidate_answers = sample_answers(http, eval_tasks, candidate, cfg, callers) if candidate else None
    reports = files.reports()
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "trainer_settings": env,
        "trains_in_bf16": trainer_computes_in_bf16(env),  # else fp32: a round is 2.3-2.9x as long
        "seconds": round(time.time() - started, 1),
        "start_version": start_version,
        "final_version": final_version,
        "feedback": {
            "mode": cfg.feedback,
            "requests": phase.requests,
            "failures": phase.failures,
            "thumbs": phase.thumbs,
            "rankings": phase.rankings,
            "ratings": phase.ratings,
            "corrections": phase.corrections,
            **(
                {
                    "prompts_distinct": len(phase.prompts),
                    "prompts_repeated": sum(n - 1 for n in phase.prompts.values()),
                    "prompt_space": prompt_space(kinds) if custom_tasks is None else None,
                }
                if cfg.feedback == "app"
                else {}
            ),
        },
        "utility_by_version": {v: sum(u) / len(u) for v, u in phase.utility.items() if u},
        "heldout": win_rate(eval_tasks, start_answers, final_answers, heldout, cfg.seed + 11, extra),
        "training_group": win_rate(eval_tasks, start_answers, final_answers, trainers, cfg.seed + 12, extra),
        "following": {"start": following(eval_tasks, start_answers), "final": following(eval_tasks, final_answers)},
        "candidate": None
        if candidate_answers is None
        else {
            "version": candidate,
            "heldout": win_rate(eval_tasks, start_answers, candidate_answers, heldout, cfg.seed + 13, extra),
            "following": following(eval_tasks, candidate_answers),
        },
        "rounds": [_round(r) for r in reports],
        "decisions": [{k: d[k] for k in ("action", "version", "by", "reason")} for d in state["history"]],
        "labelers": [p.describe() for p in labelers],
        "examples": [
            {"prompt": t.prompt, "start": s, "final": f}
            for t, s, f in list(zip(eval_tasks, start_answers, final_answers, strict=True))[:8]
        ],
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))  # kept if what follows stops
    if cfg.compare_kto:  # the server is stopped: the cores are KTO's
        from heed.simulate.kto import compare_kto

        results["kto"] = compare_kto(
            results,
            cfg.data().root,
            cfg.out / "kto",
            eval_tasks,
            {"start": start_answers, "final": final_answers},
            heldout,
            heldout_fraction=trainer_config(env).heldout_fraction,
            max_per_caller=trainer_config(env).max_per_caller,
            max_caller_share=trainer_config(env).max_caller_share,
            lr=cfg.kto_lr,
            epochs=cfg.kto_epochs,
            beta=cfg.kto_beta,
            max_new_tokens=cfg.max_tokens,
            temperature=cfg.eval_temperature,
            seed=cfg.seed,
            extra=extra,
        )
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def trainer_settings(feedback: FeedbackMode) -> dict[str, str]:
    """The trainer's HEED_TRAINER_* settings for a population: the experiment's defaults, each
    overridden by the environment's own. The same on every host: 8 PPO iterations instead of 12
    where the trainer computes in fp32 (to fit two rounds in the window) made round 1's policy
    no better than the start (47.1% [42.8, 51.4] held-out, against 54.5% with 12; one emulated
    run each, docs/results.md)."""
    defaults = TRAINER_DEFAULTS | (APP_TRAINER_DEFAULTS if feedback == "app" else {})
    return {k: os.environ.get(k, v) for k, v in defaults.items()}


def trainer_computes_in_bf16(settings: dict[str, str]) -> bool:
    """Whether the trainer under ``settings`` trains in bf16: on its device (HEED_TRAINER_DEVICE),
    a GPU that computes in bf16 or a CPU with native bf16 (training.runtime.use_bf16)."""
    from training.runtime import resolve_device, use_bf16

    return use_bf16(None, resolve_device(trainer_config(settings).device))


def trainer_config(settings: dict[str, str]) -> TrainerConfig:
    """The trainer's configuration under the experiment's HEED_TRAINER_* ``settings``."""
    from training.config import load_trainer_config

    return load_trainer_config(env={**os.environ, **settings})


def _round(report: dict[str, Any]) -> dict[str, Any]:
    gate = {c["name"]: c["value"] for c in report.get("gate", [])}
    ppo = report.get("stages", {}).get("ppo", {})
    return {
        "round": report.get("round"),
        "decision": report.get("decision"),
        "feedback": report.get("data", {}).get("feedback_total"),
        "rm_heldout_accuracy": gate.get("rm_heldout_accuracy"),
        "rm_heldout": report.get("stages", {}).get("reward_model", {}).get("heldout"),
        "win_rate_rm": gate.get("win_rate"),
        "kl": gate.get("kl"),
        "reward": [ppo.get("first", {}).get("reward"), ppo.get("last", {}).get("reward")],
        "seconds": sum(s.get("seconds", 0) for s in report.get("stages", {}).values()),
    }
