"""What serving versions as LoRA adapters costs on this machine (issue 16's first question).

vLLM's own OpenAI server on the same model, in two set-ups, one at a time on a quiet machine:

- ``base``: the model alone, vLLM's defaults (torch.compile on);
- ``lora``: the same model with ``--enable-lora`` (vLLM's CPU build then runs without
  torch.compile) and two random rank-r adapters on the 7 projections, loaded at start, measured
  twice: requests without an adapter (``lora-none``), and requests split 50/50 between the two
  adapters (``lora-2``, what stable and canary as adapters of one engine would take).

For each: requests/s, output tokens/s, p50/p99 latency and time to first token, start-up, and
the server's memory (PSS of its process tree, summed: RSS counts shared pages twice). The
figures for ``lora-*`` are printed as ratios to ``base``. heed's own two-slot set-up (stable and
a warm canary, two engines) is measured by bench/serving.py --configs canary50.

    .venv/bin/python bench/adapters.py                   # bundled SmolLM2-135M, r 8, 120 requests, C=16
    .venv/bin/python bench/adapters.py --rank 16 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import httpx

from heed.launcher import ProcessGroup, exit_on_sigterm, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import METRICS as SERVING_METRICS  # noqa: E402  (bench/serving.py)
from serving import (  # noqa: E402
    PROJECTIONS,
    PROMPTS,
    Figures,
    figures_of,
    machine,
    make_adapter,
    one_request,
    server_pss_mib,
    wait_quiet,
)


async def run_load(
    url: str, models: list[str], requests: int, concurrency: int, max_tokens: int
) -> tuple[list[tuple[float, float, int]], int, float]:
    """``requests`` streamed chat requests at ``concurrency``, request i to ``models[i % len]``."""
    results: list[tuple[float, float, int]] = []
    failed = 0
    queue = list(range(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(4):  # warm-up (every model once at least), not measured
            await one_request(client, models[i % len(models)], PROMPTS[i], max_tokens, f"warm-up-{i}")

        async def worker() -> None:
            nonlocal failed
            while queue:
                i = queue.pop()
                try:
                    model = models[i % len(models)]
                    results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, f"u{i}"))
                except httpx.HTTPError:
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, failed, time.perf_counter() - started


def figures(
    name: str, load: tuple[list[tuple[float, float, int]], int, float], startup: float, pss: float, busy: float
) -> Figures:
    f = replace(figures_of(name, load, startup, busy), pss_mib=pss)
    print(f"[{name}] {f.requests_per_s:.3f} requests/s, p99 {f.latency_p99_s:.2f} s, PSS {pss:.0f} MiB", flush=True)
    return f


METRICS = [*SERVING_METRICS, ("PSS (MiB)", "pss_mib")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--rank", type=int, default=8, help="the adapters' LoRA rank (vLLM: 1, 8, 16, 32, 64, ...)")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--quiet-below", type=float, default=15.0, help="CPU busy %% the machine must be under")
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapters.json"))
    args = parser.parse_args()
    exit_on_sigterm()

    from heed.hardware import CPU_ENGINE_ENV, engine_dtype
    from heed.models import resolve_model

    model_dir = str(resolve_model(args.model))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), **CPU_ENGINE_ENV}
    dtype = engine_dtype("auto")
    tmp = Path(tempfile.mkdtemp(prefix="heed-bench-adapters-"))
    adapters = [make_adapter(model_dir, tmp / f"adapter-{k}", args.rank, seed=k) for k in (1, 2)]
    same = ["--model", model_dir, "--served-model-name", "base", "--disable-log-stats", "--seed", "0"]
    same += ["--max-model-len", "2048", "--max-num-seqs", "64", "--dtype", dtype]
    lora = ["--enable-lora", "--max-loras", "3", "--max-lora-rank", str(args.rank), "--max-cpu-loras", "4"]
    lora += ["--lora-modules", *(f"a{k}={path}" for k, path in enumerate(adapters, start=1))]
    results: dict[str, Figures] = {}
    try:
        for setup, extra, loads in (
            ("base", [], {"base": ["base"]}),
            ("lora", lora, {"lora-none": ["base"], "lora-2": ["a1", "a2"]}),
        ):
            busy = wait_quiet(args.quiet_below, timeout_s=120)
            port = free_port()
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), *same, *extra]
            print(f"[{setup}] starting: {' '.join(command)}", flush=True)
            url = f"http://127.0.0.1:{port}"
            with ProcessGroup(command, tmp / f"{setup}.log", env=env) as server:
                startup = server.wait_for(url + "/health", timeout_s=900, poll_s=1)
                print(f"[{setup}] ready in {startup:.0f}s", flush=True)
                for name, models in loads.items():
                    load = asyncio.run(run_load(url, models, args.requests, args.concurrency, args.max_tokens))
                    results[name] = figures(name, load, startup, server_pss_mib(server.pid), busy)
    finally:
        logs = args.out.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in tmp.glob("*.log"):
            shutil.copy(log, logs / f"adapters-{log.name}")
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\n{args.requests} chat requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, greedy, "
        f"dtype {dtype}, LoRA rank {args.rank} on {len(PROJECTIONS)} projections; model {model_dir}"
    )
    print(f"{'':18}{'base':>11}{'lora-none':>11}{'lora-2':>11}{'none/base':>11}{'2/base':>9}")
    for label, key in METRICS:
        b, n, two = (getattr(results[k], key) for k in ("base", "lora-none", "lora-2"))
        print(f"{label:18}{b:11.3f}{n:11.3f}{two:11.3f}{n / b:11.3f}{two / b:9.3f}")
    print(f"failed requests: {{{', '.join(f'{k}: {v.failed}' for k, v in results.items())}}}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "settings": vars(args) | {"out": str(args.out), "model": model_dir, "dtype": dtype},
                "results": {k: asdict(v) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
