"""Serving benchmark: heed (logging every request durably) against vLLM's own OpenAI server.

Same model, same engine settings, same load (fixed chat prompts, greedy, fixed max_tokens,
N requests at concurrency C), one server at a time on this machine, in one run. Prints
requests/s, output tokens/s, p50/p99 latency and time to first token for both, and their ratio.

    .venv/bin/python bench/serving.py                     # bundled SmolLM2-135M, 200 requests, C=16
    .venv/bin/python bench/serving.py --requests 64 --enforce-eager
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, output tokens) of one streamed chat request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
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
            await one_request(client, model, PROMPTS[i], max_tokens)

        async def worker() -> None:
            nonlocal failed
            while queue:
                i = queue.pop()
                try:
                    results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))
                except httpx.HTTPError:
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, failed, time.perf_counter() - started


def measure(
    name: str, server: ProcessGroup, url: str, ready_path: str, model: str, args: argparse.Namespace
) -> Figures:
    """Wait for ``server`` (started), load it, stop it; its figures."""
    print(f"[{name}] starting: {' '.join(server.command)}", flush=True)
    with server:
        startup = server.wait_for(url + ready_path, timeout_s=900, poll_s=1)
        print(
            f"[{name}] ready in {startup:.0f}s; {args.requests} requests at concurrency {args.concurrency}", flush=True
        )
        results, failed, seconds = asyncio.run(run_load(url, model, args.requests, args.concurrency, args.max_tokens))
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
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true", help="both servers without torch.compile")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="weights dtype for both servers (default: as heed chooses)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args()
    exit_on_sigterm()  # stopped from outside: still stop the server under test (`with` blocks)

    from heed.models import resolve_model

    model_dir = str(resolve_model(args.model))
    kv_cache = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    from heed.hardware import engine_dtype

    # The same engine settings for both; the same weights dtype too (float32 on a CPU without
    # native bf16: 4.5x faster here).
    dtype = engine_dtype(args.dtype)
    same = ["--max-model-len", "2048", "--max-num-seqs", "64", "--dtype", dtype]
    same += ["--enforce-eager"] if args.enforce_eager else []
    tmp = Path(tempfile.mkdtemp(prefix="heed-bench-"))
    figures = []
    try:
        port = free_port()
        vllm_server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
        vllm_server += ["--port", str(port), "--served-model-name", "bench", "--disable-log-stats", "--seed", "0"]
        vllm = ProcessGroup([*vllm_server, *same], tmp / "vllm.log", env={**os.environ, **kv_cache})
        figures.append(measure("vllm-openai", vllm, f"http://127.0.0.1:{port}", "/health", "bench", args))
        heed_args = ("--kv-cache-gib", str(args.kv_cache_gib), *same)
        heed = ServerProcess(ServeSpec(tmp / "data", tmp / "heed.log", model=model_dir, args=heed_args, env=kv_cache))
        figures.append(measure("heed (logging on)", heed, heed.http_url, "/ready", "heed", args))
        from heed.eventlog import open_store

        store = open_store(heed.data.events)
        logged = store.last_seq()
        store.close()
    finally:
        logs = args.out.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in tmp.glob("*.log"):
            shutil.copy(log, logs / log.name)
        shutil.rmtree(tmp, ignore_errors=True)

    anchor, ours = figures
    rows = [
        ("requests/s", "requests_per_s", True),
        ("output tokens/s", "output_tokens_per_s", True),
        ("latency p50 (s)", "latency_p50_s", False),
        ("latency p99 (s)", "latency_p99_s", False),
        ("TTFT p50 (s)", "ttft_p50_s", False),
        ("TTFT p99 (s)", "ttft_p99_s", False),
        ("start-up (s)", "startup_s", False),
    ]
    print(
        f"\n{args.requests} chat requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, greedy, "
        f"{'eager' if args.enforce_eager else 'compiled'}, dtype {dtype}; model {model_dir}"
    )
    print(f"{'':18}{'vLLM server':>14}{'heed':>14}{'heed / vLLM':>14}")
    for label, key, _ in rows:
        a, b = getattr(anchor, key), getattr(ours, key)
        print(f"{label:18}{a:14.3f}{b:14.3f}{b / a:14.3f}")
    print(f"failed requests: vLLM {anchor.failed}, heed {ours.failed}; records in heed's event log: {logged}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "settings": vars(args) | {"out": str(args.out), "model": model_dir},
                "figures": [asdict(f) for f in figures],
                "heed_logged_records": logged,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
