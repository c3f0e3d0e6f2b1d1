"""Soak benchmark: a long mixed load with a swap every minute, then an audit of the event log.

Runs `heed serve` as users get it (the bundled SmolLM2-135M-Instruct, compiled engines, the warm
canary slot, API keys on) and keeps C callers busy for the whole run with a mix of chat and
completions requests (some streamed), thumbs and ratings on what they got, and read-backs of
their completions. Every minute it moves the rollout: a new version (a perturbed copy of the
model, published to the registry) becomes the canary, then is rolled back or promoted, so each
swap happens under load. The controller's own decisions are off (the feedback here is noise).

At the end it checks, against the event log itself, that every completion and every piece of
feedback the server acknowledged (200/201) is there; it prints the 5xx by code (retryable 503s
apart from unexpected ones), the latency p50/p99 of each kind of request, and the resident
memory of the server's processes (the main process and the engines) after warm-up and at the
end.

    .venv/bin/python bench/soak.py                       # 10 minutes, C=32, a swap every 60 s
    .venv/bin/python bench/soak.py --minutes 2 --concurrency 8 --swap-every 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil

from heed.launcher import ServerProcess, ServeSpec, exit_on_sigterm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swap import perturbed_copy  # noqa: E402  (bench/swap.py)

from serving import PROMPTS, percentile  # noqa: E402  (bench/serving.py)

RETRYABLE = {"swap_in_progress", "version_changed", "overloaded"}  # documented 503s a client retries


class Tally:
    """What the callers saw: acknowledged ids, statuses, latencies by kind."""

    def __init__(self) -> None:
        self.completions: set[str] = set()
        self.feedback: set[str] = set()
        self.statuses: Counter[tuple[str, int, str]] = Counter()  # (kind, status, error code)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.transport_errors: Counter[str] = Counter()

    def saw(self, kind: str, response: httpx.Response | None, seconds: float, code: str = "") -> None:
        if response is None:
            self.transport_errors[kind] += 1
            return
        if response.status_code >= 400 and not code:
            try:
                code = str(response.json()["error"].get("code") or response.json()["error"]["type"])
            except (ValueError, KeyError, TypeError):
                code = "?"
        self.statuses[(kind, response.status_code, code)] += 1
        if response.status_code < 400:
            self.latency[kind].append(seconds)


async def generate(client: httpx.AsyncClient, worker: int, i: int, tally: Tally, rng: random.Random) -> str | None:
    """One completion request of a random kind; its id when acknowledged."""
    prompt = PROMPTS[(worker * 7 + i) % len(PROMPTS)]
    user = f"soak-{worker}"
    roll = rng.random()
    if roll < 0.15:
        kind, path = "completion", "/v1/completions"
        body: dict[str, Any] = {"model": "heed", "prompt": prompt, "max_tokens": 32, "user": user}
    else:
        kind, path = "chat", "/v1/chat/completions"
        body = {"model": "heed", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "user": user}
        if rng.random() < 0.1:
            body["n"] = 2
    stream = rng.random() < 0.35
    started = time.perf_counter()
    if not stream:
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError:
            tally.saw(kind, None, 0.0)
            return None
        tally.saw(kind, response, time.perf_counter() - started)
        return response.json()["id"] if response.status_code == 200 else None
    kind += "_stream"
    completion_id, done, error = None, False, ""
    try:
        async with client.stream("POST", path, json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = str(event["error"].get("code") or event["error"]["type"])
                completion_id = completion_id or event.get("id")
            if response.status_code != 200:
                await response.aread()
    except httpx.HTTPError:
        tally.saw(kind, None, 0.0)
        return None
    if response.status_code == 200 and (error or not done):
        tally.saw(kind, httpx.Response(599), 0.0, code=error or "stream_cut")  # failed after its headers
        return None
    tally.saw(kind, response, time.perf_counter() - started)
    return completion_id if response.status_code == 200 else None


async def caller(client: httpx.AsyncClient, worker: int, stop: asyncio.Event, tally: Tally) -> None:
    rng = random.Random(worker)
    i = 0
    while not stop.is_set():
        i += 1
        completion_id = await generate(client, worker, i, tally, rng)
        if completion_id is None:
            continue
        tally.completions.add(completion_id)
        if rng.random() < 0.6:
            signal = {"thumb": rng.choice([1, -1])} if rng.random() < 0.7 else {"rating": rng.randint(1, 7)}
            started = time.perf_counter()
            try:
                response = await client.post("/v1/feedback", json={"completion_id": completion_id, **signal})
            except httpx.HTTPError:
                tally.saw("feedback", None, 0.0)
                continue
            tally.saw("feedback", response, time.perf_counter() - started)
            if response.status_code == 201:
                tally.feedback.add(response.json()["id"])
        if rng.random() < 0.2:
            started = time.perf_counter()
            try:
                response = await client.get(f"/v1/completions/{completion_id}")
            except httpx.HTTPError:
                tally.saw("readback", None, 0.0)
                continue
            tally.saw("readback", response, time.perf_counter() - started)


def resident_mib(pid: int) -> dict[str, float]:
    """Resident memory of the server's main process and of all its processes, MiB."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return {"main": root.memory_info().rss / 2**20, "all": total / 2**20}


async def steer(
    client: httpx.AsyncClient,
    server: ServerProcess,
    folders: list[Path],
    every: float,
    stop: asyncio.Event,
) -> list[dict[str, Any]]:
    """Every ``every`` seconds: a new canary, then a rollback or a promote, alternately."""
    from heed.registry import PolicyRegistry

    registry = PolicyRegistry(server.data.registry)
    actions: list[dict[str, Any]] = []
    n = 0
    begun = time.monotonic()
    while True:
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return actions
        except TimeoutError:
            pass
        status = (await client.get("/admin/rollout")).json()
        if status["canary"] is None:
            folder = folders[n % len(folders)]
            version = (await asyncio.to_thread(registry.publish, folder, parent=status["stable"])).version
            action, body = "canary", {"version": version}
        else:
            action, body = ("rollback" if n % 4 == 1 else "promote"), {}
        started = time.perf_counter()
        response = await client.post(f"/admin/rollout/{action}", json=body)
        took = time.perf_counter() - started
        at = round(time.monotonic() - begun, 1)
        actions.append(
            {"action": action, **body, "status": response.status_code, "seconds": round(took, 2), "at_s": at}
        )
        print(
            f"  {time.strftime('%H:%M:%S')} {action} {body.get('version', '')} -> {response.status_code} in "
            f"{took:.1f} s",
            flush=True,
        )
        n += 1


def audit(server: ServerProcess, tally: Tally) -> dict[str, Any]:
    """Every acknowledged completion and feedback id is in the log (read after the server stopped)."""
    from heed.eventlog import CompletionRecord, FeedbackRecord, open_store

    store = open_store(server.data.events)
    try:
        records = [e.record for e in store.read(limit=10_000_000)]
    finally:
        store.close()
    logged_completions = {r.completion_id for r in records if isinstance(r, CompletionRecord)}
    logged_feedback = {r.feedback_id for r in records if isinstance(r, FeedbackRecord)}
    return {
        "acknowledged_completions": len(tally.completions),
        "acknowledged_feedback": len(tally.feedback),
        "logged_completions": len(logged_completions),
        "logged_feedback": len(logged_feedback),
        "lost_completions": sorted(tally.completions - logged_completions),
        "lost_feedback": sorted(tally.feedback - logged_feedback),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from heed.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="heed-bench-soak-"))
    base = Path(resolve_model("default"))
    folders = [perturbed_copy(base, work / "v-a", scale=0.02), perturbed_copy(base, work / "v-b", scale=0.01)]
    # The controller decides nothing on its own (this feedback is noise): the bench steers.
    by_hand = ("--registry-poll-s", "0", "--min-feedback-per-step", "1000000")
    trusted = ("--user-principals", "soak")  # the callers' end users split between stable and canary
    spec = ServeSpec(
        work / "data",
        work / "server.log",
        keys={"soak": "sk-" + secrets.token_urlsafe(16)},
        admin_keys={"bench": secrets.token_urlsafe(24)},
        enforce_eager=args.enforce_eager,
        args=(*by_hand, *trusted),
    )
    server = ServerProcess(spec)
    tally = Tally()
    memory: list[tuple[float, dict[str, float]]] = []
    try:
        startup = server.wait_ready()
        print(f"ready in {startup:.0f} s; {args.concurrency} callers for {args.minutes} min", flush=True)
        limits = httpx.Limits(max_connections=args.concurrency + 8)
        async with (
            httpx.AsyncClient(base_url=server.http_url, timeout=120, headers=server.headers(), limits=limits) as api,
            httpx.AsyncClient(base_url=server.http_url, timeout=600, headers=server.admin_headers()) as admin,
        ):
            stop = asyncio.Event()
            started = time.monotonic()
            callers = [asyncio.create_task(caller(api, w, stop, tally)) for w in range(args.concurrency)]
            steering = asyncio.create_task(steer(admin, server, folders, args.swap_every, stop))
            while (elapsed := time.monotonic() - started) < args.minutes * 60:
                await asyncio.sleep(min(10.0, args.minutes * 60 - elapsed))
                memory.append((time.monotonic() - started, resident_mib(server.pid)))
                done = sum(n for (kind, status, _), n in tally.statuses.items() if status < 400)
                print(f"  {memory[-1][0]:5.0f} s: {done} requests ok, {memory[-1][1]['all']:.0f} MiB", flush=True)
            stop.set()
            await asyncio.gather(*callers)
            actions = await steering
            duration = time.monotonic() - started
            metrics = (await api.get("/metrics")).text
    finally:
        server.stop()
    figures = audit(server, tally)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    server_errors = {f"{k} {s} {c}": n for (k, s, c), n in tally.statuses.items() if s >= 500}
    unexpected = {k: n for k, n in server_errors.items() if k.split()[-1] not in RETRYABLE}
    # From when both engines serve (the first canary swapped in) and the warm-up is over.
    first_move = actions[0]["at_s"] if actions else 0.0
    warm = [m for t, m in memory if t >= max(args.warmup_s, first_move)] or [m for _, m in memory]
    growth = {key: (warm[-1][key] - warm[0][key]) / warm[0][key] for key in ("main", "all")}
    swap_lines = [line for line in metrics.splitlines() if line.startswith("heed_policy_swaps_total{")]
    return {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "minutes": round(duration / 60, 2),
        "concurrency": args.concurrency,
        "startup_s": round(startup, 1),
        "requests_ok": {k: len(v) for k, v in tally.latency.items()},
        "requests_per_s": round(sum(len(v) for v in tally.latency.values()) / duration, 2),
        "latency_s": {
            k: {"p50": round(statistics.median(v), 3), "p99": round(percentile(v, 0.99), 3)}
            for k, v in sorted(tally.latency.items())
        },
        "client_errors": {f"{k} {s} {c}": n for (k, s, c), n in tally.statuses.items() if 400 <= s < 500},
        "server_errors": server_errors,
        "unexpected_5xx": sum(unexpected.values()),
        "transport_errors": dict(tally.transport_errors),
        "rollout_actions": actions,
        "swaps": swap_lines,
        "resident_mib_after_warmup": {k: round(v, 1) for k, v in warm[0].items()},
        "resident_mib_at_end": {k: round(v, 1) for k, v in warm[-1].items()},
        "resident_growth": {k: round(v, 4) for k, v in growth.items()},
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--swap-every", type=float, default=60.0, help="seconds between rollout moves")
    parser.add_argument("--warmup-s", type=float, default=120.0, help="memory growth is measured from here")
    parser.add_argument("--enforce-eager", action="store_true", help="not the default: eager engines")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server.log, log, registry)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    exit_on_sigterm()
    figures = asyncio.run(run(args))
    shown = {k: v for k, v in figures.items() if k not in ("lost_completions", "lost_feedback")}
    print(json.dumps(shown, indent=2))
    lost = len(figures["lost_completions"]) + len(figures["lost_feedback"])
    print(f"\n{'soak':<34}{'measured':>12}{'target':>12}")
    print(f"{'unexpected 5xx':<34}{figures['unexpected_5xx']:>12}{0:>12}")
    print(f"{'acknowledged but not in the log':<34}{lost:>12}{0:>12}")
    for key in ("main", "all"):
        print(f"{'resident growth, ' + key + ' processes':<34}{figures['resident_growth'][key]:>12.1%}{'< 10%':>12}")
    for kind, q in figures["latency_s"].items():
        print(f"{'p50 / p99 s, ' + kind:<34}{q['p50']:>6.2f} /{q['p99']:>5.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    if figures["unexpected_5xx"] or lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
