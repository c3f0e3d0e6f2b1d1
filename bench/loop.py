"""The loop on the bundled model: from the feedback that crosses the trainer's threshold to the
new version serving canary traffic, and what a training round does to serving latency.

Runs `heed serve --with-trainer` on SmolLM2-135M-Instruct with a warm canary slot. Synthetic
users ask short instruction prompts at a steady pace and give thumbs (up for an answer of at most
--short-words words). The trainer's threshold is small and its round short (few comparisons, few
PPO iterations) and its gate is open: this measures the machinery's timing, not what a round
learns (see docs/results.md for that). Prints the time line of the first round (threshold
crossed, each stage, published, canary serving, first canary answer) and the latency of
requests before, during and after the round.

    .venv/bin/python bench/loop.py                      # about 15-25 minutes on 2 cores
    .venv/bin/python bench/loop.py --ppo-iterations 1 --enforce-eager
    .venv/bin/python bench/loop.py --policy-mode full,adapter   # both modes, the same round settings
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from heed.launcher import ServerProcess, ServeSpec, exit_on_sigterm
from heed.trainer_files import TrainerFiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import percentile  # noqa: E402  (bench/serving.py)

PROMPTS = [
    "Name a fruit. Answer in one word.",
    "Say hello in French.",
    "Give me a color, nothing else.",
    "What is 2 + 2? Reply with the number only.",
    "Describe the sea in a short sentence.",
    "Name a city in Japan.",
]


def users(url: str, stop: threading.Event, log: list[dict], short_words: int, pace_s: float, worker: int) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        i = 0
        while not stop.is_set():
            body = {
                "model": "heed",
                "messages": [{"role": "user", "content": PROMPTS[(i + worker) % len(PROMPTS)]}],
                "max_tokens": 24,
                "user": f"user-{worker}-{i % 25}",  # enough callers that some are held out
            }
            started = time.time()
            response = http.post("/v1/chat/completions", json=body)
            ended = time.time()
            row = {"start": started, "latency": ended - started, "ok": response.status_code == 200, "model": ""}
            if response.status_code == 200:
                data = response.json()
                row["model"] = data["model"]
                words = len(data["choices"][0]["message"]["content"].split())
                thumb = 1 if words <= short_words else -1
                http.post("/v1/feedback", json={"completion_id": data["id"], "thumb": thumb})
            log.append(row)
            i += 1
            stop.wait(pace_s)


def run_one(mode: str, args: argparse.Namespace) -> dict:
    """One run of the loop with the server in ``mode``: its figures."""
    work = Path(tempfile.mkdtemp(prefix="heed-bench-loop-"))
    trainer = {
        "HEED_TRAINER_MIN_NEW_FEEDBACK": str(args.min_new_comparisons),
        "HEED_TRAINER_POLL_S": "2",
        "HEED_TRAINER_RM_MAX_EXAMPLES": str(args.rm_comparisons),
        # The gate stays open on what the held-out callers gave: all their examples, their thumbs
        # counted from the first (with 16 examples and no thumbs counted, a held-out set that
        # happened to hold no (up, down) pair left the RM's accuracy unknown, and the round failed).
        "HEED_TRAINER_HELDOUT_MAX_EXAMPLES": "0",
        "HEED_TRAINER_GATE_MIN_EXAMPLES": "1",
        "HEED_TRAINER_MIN_THUMBS_AUC": "0",
        "HEED_TRAINER_MAX_THUMBS_ECE": "1",
        "HEED_TRAINER_PPO_ITERATIONS": str(args.ppo_iterations),
        "HEED_TRAINER_PPO_EPISODES": str(args.ppo_episodes),
        "HEED_TRAINER_PPO_MINIBATCH_SIZE": "4",
        "HEED_TRAINER_MAX_NEW_TOKENS": "24",
        "HEED_TRAINER_EVAL_PROMPTS": "8",
        "HEED_TRAINER_RM_ACCURACY_MARGIN": "1",  # an open gate: this measures timing, not learning
        "HEED_TRAINER_MIN_WIN_RATE": "0",
        "HEED_TRAINER_MAX_KL": "1e9",
    }
    rollout = ["--policy-mode", mode, "--canary-slot", "warm", "--canary-warm-idle-s", "0"]  # warm at once
    rollout += ["--registry-poll-s", "1", "--rollout-interval-s", "1"]
    rollout += ["--min-feedback-per-step", "1000000"]  # the canary is never judged: it only has to serve
    spec = ServeSpec(
        work / "data",
        work / "server.log",
        with_trainer=True,
        enforce_eager=args.enforce_eager,
        args=tuple(rollout),
        env=trainer,
        admin_keys={"bench": secrets.token_urlsafe(24)},  # the admin API is off without one
        stop_timeout_s=120,
    )
    server = ServerProcess(spec)
    url = server.http_url
    rows: list[dict] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        server.wait_ready()
        if mode == "full":
            # A service that has run a while has its canary slot warm before the threshold comes:
            # measured here, a warm-up under way (an engine start and its compilation) slowed the
            # round's reward model about twofold (134 s against 64 s).
            warm = server.wait_for_warm_canary()
            print(f"[{mode}] the canary slot was warm {warm:.0f} s after the server was ready", flush=True)
        print(f"[{mode}] serving; users start", flush=True)
        for w in range(args.users):
            threads.append(threading.Thread(target=users, args=(url, stop, rows, args.short_words, args.pace, w)))
            threads[-1].start()
        while True:
            status = httpx.get(url + "/admin/rollout", timeout=30, headers=server.admin_headers()).json()
            if status["canary"]:
                break
            if server.process.poll() is not None:
                raise RuntimeError(server.log_text()[-3000:])
            time.sleep(2)
        canary = status["canary"]
        print(f"[{mode}] canary {canary} is serving; {args.after:.0f} s more of load", flush=True)
        time.sleep(args.after)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()

    reports = TrainerFiles.of(server.data.root).reports()
    report = next(r for r in reports if r.get("version") == canary)  # the round that made the canary
    rejected = [r["decision"] for r in reports if r["round"] < report["round"]]
    started_canary = next(d["time"] for d in status["history"] if d["action"] == "canary_started")
    first_answer = min((r["start"] + r["latency"] for r in rows if r["model"] == canary), default=None)
    t0 = report["started"]
    timeline = {
        "threshold_crossed_to_round_start_s": 0.0,
        **{f"{name}_s": stage.get("seconds") for name, stage in report["stages"].items()},
        "round_s": report["finished"] - t0,
        "published_to_canary_serving_s": started_canary - report["finished"],
        "threshold_to_canary_serving_s": started_canary - t0,
        "threshold_to_first_canary_answer_s": (first_answer - t0) if first_answer else None,
    }

    def phase(rows_: list[dict]) -> dict:
        lat = [r["latency"] for r in rows_ if r["ok"]] or [0.0]
        return {
            "requests": len(rows_),
            "failed": sum(not r["ok"] for r in rows_),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(percentile(lat, 0.99), 3),
        }

    phases = {
        "before_round": phase([r for r in rows if r["start"] < t0]),
        "during_round": phase([r for r in rows if t0 <= r["start"] < report["finished"]]),
        "after_round": phase([r for r in rows if r["start"] >= report["finished"]]),
    }
    figures = {
        "policy_mode": mode,
        "timeline": timeline,
        "serving": phases,
        "round": {k: report[k] for k in ("round", "data", "memory", "decision")},
        "earlier_rounds_rejected": rejected,
        "peak_rss_gib": {k: v.get("peak_rss_gib") for k, v in report["stages"].items()},
        # seconds at each torch thread count (the trainer follows the free cores)
        "torch_threads_s": {k: v["torch_threads_s"] for k, v in report["stages"].items() if "torch_threads_s" in v},
    }
    if args.out:  # the server's and the trainer's log, kept beside the figures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "server.log", args.out.with_name(f"{args.out.stem}-{mode}-server.log"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2, help="concurrent synthetic users")
    parser.add_argument("--pace", type=float, default=1.0, help="seconds a user waits between questions")
    parser.add_argument("--short-words", type=int, default=8, help="the users like answers of at most this many words")
    parser.add_argument("--min-new-comparisons", type=int, default=96, help="the trainer's threshold")
    parser.add_argument("--rm-comparisons", type=int, default=32)
    parser.add_argument("--ppo-iterations", type=int, default=2)
    parser.add_argument("--ppo-episodes", type=int, default=8)
    parser.add_argument("--after", type=float, default=60, help="seconds of load after the canary starts")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--policy-mode",
        default="full",
        help="the server's --policy-mode; full,adapter runs each in turn and prints them side by side",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (data, registry, logs)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the figures here as JSON, and each run's server log beside it"
    )
    args = parser.parse_args()

    exit_on_sigterm()  # stopped from outside: still stop the server (the finally in run_one)
    runs = []
    for mode in [m.strip() for m in args.policy_mode.split(",") if m.strip()]:
        runs.append(run_one(mode, args))
        print(json.dumps(runs[-1], indent=2), flush=True)  # each as it ends: a long run cut short keeps it
    if len(runs) > 1:
        print(f"\n{'':40}" + "".join(f"{r['policy_mode']:>12}" for r in runs))
        for key in runs[0]["timeline"]:
            values = [r["timeline"].get(key) for r in runs]
            print(f"{key:40}" + "".join(f"{v:12.1f}" if isinstance(v, (int, float)) else f"{'-':>12}" for v in values))
        for phase in runs[0]["serving"]:
            values = [r["serving"][phase]["latency_p99_s"] for r in runs]
            print(f"{'p99 latency ' + phase + ' (s)':40}" + "".join(f"{v:12.3f}" for v in values))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
