"""Serving benchmark: heed (logging every request durably) against vLLM's own OpenAI server.

Same model, same engine settings, same load (fixed chat prompts, greedy, fixed max_tokens,
N requests at concurrency C, after the same 4 warm-up requests), one server at a time. heed runs
in its default configuration (the warm canary slot on) and in the others named by --configs
(adapter50: adapter mode, one engine, a LoRA canary at 50%; adapter3: the same with a first
adapter promoted before it, so that three versions are resident).
Each repeat measures vLLM's server and every heed configuration, in an order that alternates
between repeats, each on a quiet machine (it waits for one, and says when it did not get one).
Prints the median of the per-repeat ratios heed / vLLM with their spread (min-max), for
requests/s, output tokens/s, p50/p99 latency and time to first token.

--profile samples the servers' front-end processes (heed's main process, vLLM's API server)
with py-spy during the first repeat's load and prints where their CPU time goes.

    .venv/bin/python bench/serving.py                     # bundled SmolLM2-135M, 120 requests, C=16, 3 repeats
    .venv/bin/python bench/serving.py --requests 64 --enforce-eager --repeats 1 --configs default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from heed.launcher import ProcessGroup, ServerProcess, ServeSpec, exit_on_sigterm, free_port

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "What is the capital of France, and what is it known for?",
    "Give me a short tip for learning to cook.",
    "Describe a cat to someone who has never seen one.",
    "Why do we need sleep?",
    "Summarize the plot of a hero's journey in one paragraph.",
]


@dataclass
class Figures:
    name: str
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    startup_s: float
    busy_before_pct: float  # the machine's CPU use just before the server started
    logged: int = -1  # heed: completions in its event log after the run (the load + warm-up)
    pss_mib: float = -1.0  # the server's memory after the run (bench/adapters.py)


def figures_of(
    name: str, load: tuple[list[tuple[float, float, int]], int, float], startup: float, busy: float
) -> Figures:
    """The figures of one load: ``load`` is (per request (latency, TTFT, output tokens), failed, seconds)."""
    results, failed, seconds = load
    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return Figures(
        name,
        len(results),
        failed,
        seconds,
        len(results) / seconds,
        tokens / seconds,
        statistics.median(latencies),
        percentile(latencies, 0.99),
        statistics.median(ttfts),
        percentile(ttfts, 0.99),
        startup,
        busy,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, user: str
) -> tuple[float, float, int]:
    """(latency, time to first token, output tokens) of one streamed chat request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "user": user,  # many end users: heed's canary split is per caller
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first if first is not None else float("nan"), tokens


async def run_load(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> tuple[list, int, float]:
    results: list[tuple[float, float, int]] = []
    failed = 0
    queue = list(range(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(4):  # warm-up, not measured
            await one_request(client, model, PROMPTS[i], max_tokens, f"warm-up-{i}")

        async def worker() -> None:
            nonlocal failed
            while queue:
                i = queue.pop()
                try:
                    prompt = PROMPTS[i % len(PROMPTS)]
                    results.append(await one_request(client, model, prompt, max_tokens, f"user-{i}"))
                except httpx.HTTPError:
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, failed, time.perf_counter() - started


# heed's configurations by name: its flags. canary50: a canary (a copy of the model, published as
# a new version) live at 50% of the traffic, held there (no feedback moves it) during the load;
# engine-stats: the engine slots keep vLLM's per-step stats (the heed_engine_* figures).
CONFIGS = {
    "default": (),
    "lazy": ("--canary-slot", "lazy"),
    "engine-stats": ("--engine-stats",),
    "canary50": ("--registry-poll-s", "0", "--min-feedback-per-step", "1000000", "--canary-steps", "50,100"),
}
# adapter50: adapter mode (one engine with LoRA), its canary a rank-8 LoRA adapter at 50%, the
# stable the base (served as an adapter of zeros): two adapters taking traffic.
CONFIGS["adapter50"] = ("--policy-mode", "adapter", *CONFIGS["canary50"])
# adapter3: the same with three versions resident: a first adapter canaried and promoted (the base
# stays, as the previous stable), then a second the canary at 50%: two adapters take traffic.
CONFIGS["adapter3"] = CONFIGS["adapter50"]
ADMIN = {"bench": "sk-admin-bench"}  # heed's admin API (canary50 starts its canary with it)
METRICS = [
    ("requests/s", "requests_per_s"),
    ("output tokens/s", "output_tokens_per_s"),
    ("latency p50 (s)", "latency_p50_s"),
    ("latency p99 (s)", "latency_p99_s"),
    ("TTFT p50 (s)", "ttft_p50_s"),
    ("TTFT p99 (s)", "ttft_p99_s"),
    ("start-up (s)", "startup_s"),
]


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "avx512f": "avx512f" in cpuinfo,
        "avx512_bf16": "avx512_bf16" in cpuinfo,
    }


def wait_quiet(max_busy_pct: float, timeout_s: float) -> float:
    """Wait (at most ``timeout_s``) until the machine's CPU use over 3 s is below ``max_busy_pct``;
    the last figure measured."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = psutil.cpu_percent(interval=3)
        if busy < max_busy_pct or time.monotonic() > deadline:
            if busy >= max_busy_pct:
                print(f"  warning: the machine is not quiet ({busy:.0f}% CPU busy); measuring anyway", flush=True)
            return busy


class Profile:
    """py-spy sampling one process (and its threads) while it is alive; raw collapsed stacks."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        spy = Path(sys.executable).with_name("py-spy")
        command = [str(spy), "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "-o", str(out)]
        self.process = subprocess.Popen([*command, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> Path:
        self.process.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self.out


# Where a front end's CPU time goes, by the first frame (innermost first) that names a part.
PARTS = [
    ("tokenization and chat template", ("tokeniz", "apply_chat_template", "jinja2")),
    ("event log (SQLite commit, fsync)", ("event_writer", "eventlog", "sqlite3")),
    ("metrics", ("prometheus_client", "serving/metrics")),
    ("routing and leases", ("serving/router", "lease", "serving/slots")),
    ("vLLM output processing and detokenization", ("vllm/v1/engine/output_processor", "detokenizer", "vllm/outputs")),
    ("vLLM engine client (ZMQ, msgpack)", ("core_client", "zmq", "msgspec", "serial_utils")),
    ("vLLM input processing", ("input_processor", "vllm/inputs", "vllm/renderers", "sampling_params")),
    ("HTTP parsing and responses (uvicorn, starlette)", ("uvicorn", "h11", "httptools", "starlette")),
    ("JSON and SSE encoding", ("json/", "pydantic", "orjson", "sse", "serving/http", "entrypoints/openai")),
    ("the event loop and other Python", ("",)),
]


def summarize(raw: Path, top: int = 12) -> dict[str, object]:
    """Samples per part and the functions most often on top of the stack (self time)."""
    parts: dict[str, int] = {name: 0 for name, _ in PARTS}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        for name, needles in PARTS:
            if any(n in frame for frame in reversed(frames) for n in needles if n):
                parts[name] += count
                break
        else:
            parts[PARTS[-1][0]] += count
    return {
        "samples": total,
        "parts": {k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v},
        "top_functions": sorted(leaves.items(), key=lambda kv: -kv[1])[:top],
    }


def measure(
    name: str,
    server: ProcessGroup,
    url: str,
    ready_path: str,
    model: str,
    args: argparse.Namespace,
    busy: float,
    profile: Path | None,
    before_load: Callable[[], None] | None = None,
) -> Figures:
    """Wait for ``server`` (started), call ``before_load``, load it (sampling it into ``profile``),
    stop it; its figures. ``busy``: the machine's CPU use measured just before it started."""
    print(f"[{name}] starting: {' '.join(server.command)}", flush=True)
    with server:
        startup = server.wait_for(url + ready_path, timeout_s=900, poll_s=1)
        if before_load is not None:
            before_load()
        print(
            f"[{name}] ready in {startup:.0f}s; {args.requests} requests at concurrency {args.concurrency}", flush=True
        )
        spy = Profile(server.pid, profile) if profile else None  # the front end: the group's leader
        try:
            load = asyncio.run(run_load(url, model, args.requests, args.concurrency, args.max_tokens))
        finally:
            if spy is not None:
                spy.stop()
        pss = server_pss_mib(server.pid)
    figures = figures_of(name, load, startup, busy)
    figures.pss_mib = pss
    print(
        f"[{name}] {figures.requests_per_s:.3f} requests/s, p99 {figures.latency_p99_s:.2f} s, "
        f"PSS {pss / 1024:.2f} GiB",
        flush=True,
    )
    return figures


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: str, dest: Path, rank: int, seed: int) -> Path:
    """A peft LoRA adapter of ``rank`` on the 7 projections with random nonzero B (so it moves the
    model), saved as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(str(dest))
    return dest


def server_pss_mib(pid: int) -> float:
    """PSS of the process ``pid`` and all its descendants, in MiB."""
    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


def start_canary(server: ServerProcess, model_dir: str, adapter: Path | None = None) -> None:
    """Publish a copy of the model (or ``adapter``, a LoRA adapter on it) as a new version and
    make it the canary (at the first step)."""
    from heed.registry import PolicyRegistry

    started = time.perf_counter()
    registry = PolicyRegistry(server.data.registry)
    stable = Path(model_dir).name
    if adapter is None:
        version = registry.publish(Path(model_dir), parent=stable).version
    else:
        version = registry.publish(adapter, parent=stable, mode="adapter", base=stable).version
    reply = httpx.post(
        server.http_url + "/admin/rollout/canary",
        json={"version": version},
        headers=server.admin_headers(),
        timeout=900,
    )
    reply.raise_for_status()
    share = reply.json()["canary_share"]
    print(f"  canary {version} live at {share:.0f}% after {time.perf_counter() - started:.1f} s", flush=True)


def promote(server: ServerProcess) -> None:
    reply = httpx.post(server.http_url + "/admin/rollout/promote", json={}, headers=server.admin_headers(), timeout=300)
    reply.raise_for_status()
    print(f"  {reply.json().get('stable')} promoted", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the ratios' median is reported")
    parser.add_argument(
        "--configs",
        default="default,lazy,canary50",
        help=f"heed configurations, comma-separated, of: {', '.join(CONFIGS)}",
    )
    parser.add_argument("--enforce-eager", action="store_true", help="both servers without torch.compile")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="weights dtype for both servers (default: as heed chooses)")
    parser.add_argument("--quiet-below", type=float, default=15.0, help="CPU busy %% the machine must be under")
    parser.add_argument("--profile", action="store_true", help="sample the front ends with py-spy (first repeat)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    exit_on_sigterm()  # stopped from outside: still stop the server under test (`with` blocks)

    from heed.models import resolve_model

    model_dir = str(resolve_model(args.model))
    from heed.hardware import CPU_ENGINE_ENV, engine_dtype

    # The same engine settings for both; the same weights dtype too (float32 on a CPU without
    # native bf16: 4.5x faster here), and the same vLLM environment (on the CPU build heed turns
    # off vLLM's AOT compilation, whose cache cannot be loaded back there: it only changes start-up).
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), **CPU_ENGINE_ENV}
    dtype = engine_dtype(args.dtype)
    same = ["--max-model-len", "2048", "--max-num-seqs", "64", "--dtype", dtype]
    same += ["--enforce-eager"] if args.enforce_eager else []
    tmp = Path(tempfile.mkdtemp(prefix="heed-bench-"))
    runs: list[dict[str, Figures]] = []
    profiles: dict[str, dict[str, object]] = {}
    names = ["vllm", *configs]
    wanted = 2 if "adapter3" in configs else 1 if "adapter50" in configs else 0  # adapter3 needs two
    adapters = [make_adapter(model_dir, tmp / f"adapter-{seed}", rank=8, seed=seed) for seed in (1, 2)[:wanted]]
    try:
        for repeat in range(args.repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            print(f"\n== repeat {repeat + 1} of {args.repeats}: {', '.join(order)}", flush=True)
            run: dict[str, Figures] = {}
            for name in order:
                busy = wait_quiet(args.quiet_below, timeout_s=120)
                profile = tmp / f"profile-{name}.txt" if args.profile and repeat == 0 else None
                if name == "vllm":
                    port = free_port()
                    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
                    command += ["--port", str(port), "--served-model-name", "bench", "--disable-log-stats"]
                    group = ProcessGroup(
                        [*command, "--seed", "0", *same], tmp / f"vllm-{repeat}.log", env={**os.environ, **env}
                    )
                    run[name] = measure(
                        "vllm-openai", group, f"http://127.0.0.1:{port}", "/health", "bench", args, busy, profile
                    )
                else:
                    heed_args = ("--kv-cache-gib", str(args.kv_cache_gib), *same, *CONFIGS[name])
                    spec = ServeSpec(
                        tmp / f"data-{name}-{repeat}",
                        tmp / f"heed-{name}-{repeat}.log",
                        model=model_dir,
                        args=heed_args,
                        env=env,
                        admin_keys=ADMIN,
                    )
                    heed = ServerProcess(spec)
                    canary = None
                    if name == "canary50":
                        canary = lambda server=heed: start_canary(server, model_dir)  # noqa: E731
                    elif name == "adapter50":
                        canary = lambda server=heed: start_canary(server, model_dir, adapters[0])  # noqa: E731
                    elif name == "adapter3":

                        def canary(server: ServerProcess = heed) -> None:
                            start_canary(server, model_dir, adapters[0])
                            promote(server)
                            start_canary(server, model_dir, adapters[1])

                    run[name] = measure(
                        f"heed {name}", heed, heed.http_url, "/ready", "heed", args, busy, profile, canary
                    )
                    from heed.eventlog import open_store

                    store = open_store(heed.data.events)
                    run[name].logged = store.last_seq()
                    store.close()
                if profile is not None:
                    profiles[name] = summarize(profile)
            runs.append(run)
    finally:
        logs = args.out.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in [*tmp.glob("*.log"), *tmp.glob("profile-*.txt")]:
            shutil.copy(log, logs / log.name)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\n{args.requests} chat requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, greedy, "
        f"{'eager' if args.enforce_eager else 'compiled'}, dtype {dtype}; {len(runs)} interleaved repeats; "
        f"model {model_dir}"
    )
    summary: dict[str, dict[str, list[float]]] = {}
    for config in configs:
        print(f"\nheed {config} against vLLM's server: medians over the repeats; the ratio's min-max")
        print(f"{'':18}{'vLLM server':>13}{'heed':>13}{'heed / vLLM':>13}   spread")
        for label, key in METRICS:
            a = [getattr(r["vllm"], key) for r in runs]
            b = [getattr(r[config], key) for r in runs]
            ratios = [y / x for x, y in zip(a, b, strict=True) if x]
            summary.setdefault(config, {})[key] = ratios
            spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
            ratio = statistics.median(ratios) if ratios else float("nan")
            print(f"{label:18}{statistics.median(a):13.3f}{statistics.median(b):13.3f}{ratio:13.3f}   {spread}")
        pss = [statistics.median(r[name].pss_mib / 1024 for r in runs) for name in ("vllm", config)]
        print(f"{'memory PSS (GiB)':18}{pss[0]:13.2f}{pss[1]:13.2f}{pss[1] / pss[0]:13.3f}")
        logged = [r[config].logged for r in runs]
        expected = args.requests + 4
        print(f"logged: {logged} completions in heed's event log per repeat (each run sent {expected})")
    failed = {name: [r[name].failed for r in runs] for name in names}
    busy_by = {name: [round(r[name].busy_before_pct) for r in runs] for name in names}
    print(f"failed requests per repeat: {failed}; machine CPU busy % before each: {busy_by}")
    for name, prof in profiles.items():
        samples = int(prof["samples"])  # type: ignore[call-overload]
        print(f"\nprofile of {name}'s front-end process during the load: {samples} samples of its threads on the CPU")
        for part, count in prof["parts"].items():  # type: ignore[attr-defined]
            print(f"  {100 * count / max(samples, 1):5.1f}%  {part}")
        print("  top functions (self):")
        for frame, count in prof["top_functions"]:  # type: ignore[attr-defined]
            print(f"  {100 * count / max(samples, 1):5.1f}%  {frame[:150]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "settings": vars(args) | {"out": str(args.out), "model": model_dir},
                "runs": [{k: asdict(v) for k, v in r.items()} for r in runs],
                "ratios": summary,
                "profiles": profiles,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
