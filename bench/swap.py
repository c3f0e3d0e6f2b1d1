"""Hot-swap benchmark: how long an engine slot is closed while new weights go in, and what that
does to the latency of requests that overlap a swap, under a steady load.

Runs `heed serve` on the bundled SmolLM2-135M-Instruct, publishes a perturbed copy of it as v2,
starts it as the canary, then keeps C streamed chat requests in flight while it swaps the canary
slot back and forth (rollback / canary) and finally promotes v2 (a swap of the stable slot).
Prints the swap times the server measured (heed_policy_swap_duration_seconds) and the latency and
time to first token of requests that overlapped a swap against those that did not.

    .venv/bin/python bench/swap.py                       # compiled engines, 6 swaps, C=8
    .venv/bin/python bench/swap.py --enforce-eager --swaps 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from heed.launcher import ServerProcess, ServeSpec, exit_on_sigterm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import PROMPTS, percentile  # noqa: E402  (bench/serving.py)


def perturbed_copy(src: Path, dest: Path, scale: float = 0.02) -> Path:
    """The model with every weight moved by ``scale`` of its own spread: another version, same shapes."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.manual_seed(0)
    for file in src.glob("*.safetensors"):
        state = load_file(str(file))
        moved = {}
        for name, tensor in state.items():
            t = tensor.float()
            moved[name] = (t + scale * t.std() * torch.randn_like(t)).to(tensor.dtype)
        save_file(moved, str(dest / file.name))
    return dest


async def user(client: httpx.AsyncClient, worker: int, stop: asyncio.Event, results: list[dict]) -> None:
    i = 0
    while not stop.is_set():
        body = {
            "model": "heed",
            "messages": [{"role": "user", "content": PROMPTS[(worker + i) % len(PROMPTS)]}],
            "max_tokens": 32,
            "temperature": 0,
            "stream": True,
            "user": f"bench-{worker}",
        }
        started = time.perf_counter()
        first, ok = None, False
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {") and '"content": ""' not in line:
                        first = time.perf_counter()  # the first generated text (not the role chunk)
                    if line == "data: [DONE]":
                        ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        ended = time.perf_counter()
        results.append({"start": started, "end": ended, "ttft": (first or ended) - started, "ok": ok})
        i += 1


def swap_figures(metrics: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in metrics.splitlines():
        for kind in ("sum", "count"):
            if line.startswith(f"heed_policy_swap_duration_seconds_{kind}{{"):
                slot = line.split('slot="')[1].split('"')[0]
                out.setdefault(slot, {})[kind] = float(line.split()[-1])
    return out


async def run(args: argparse.Namespace) -> dict:
    from heed.models import resolve_model
    from heed.registry import PolicyRegistry

    work = Path(tempfile.mkdtemp(prefix="heed-bench-swap-"))
    base = Path(resolve_model("default"))
    v2_folder = perturbed_copy(base, work / "v2-src")
    rollout_by_hand = ("--registry-poll-s", "0", "--min-feedback-per-step", "1000000", "--canary-steps", "50,100")
    admin = {"bench": secrets.token_urlsafe(24)}  # the admin API is off without an admin key
    spec = ServeSpec(
        work / "data", work / "server.log", enforce_eager=args.enforce_eager, args=rollout_by_hand, admin_keys=admin
    )
    server = ServerProcess(spec)
    try:
        startup = server.wait_ready()
        headers = server.admin_headers()  # open mode: the API ignores it; the admin API needs it
        async with httpx.AsyncClient(base_url=server.http_url, timeout=600, headers=headers) as client:
            warm = server.wait_for_warm_canary(timeout_s=900)
            print(f"the canary slot is warm {warm:.0f} s after ready", flush=True)
            v2 = PolicyRegistry(server.data.registry).publish(v2_folder, parent=base.name).version
            t0 = time.perf_counter()
            (await client.post("/admin/rollout/canary", json={"version": v2})).raise_for_status()
            canary_start = time.perf_counter() - t0

            results: list[dict] = []
            windows: list[tuple[float, float, str]] = []
            stop = asyncio.Event()
            users = [asyncio.create_task(user(client, w, stop, results)) for w in range(args.concurrency)]
            await asyncio.sleep(args.gap)
            actions = ["rollback", "canary"] * (args.swaps // 2) + ["promote"]
            for action in actions:
                body = {"version": v2} if action == "canary" else None
                started = time.perf_counter()
                (await client.post(f"/admin/rollout/{action}", json=body)).raise_for_status()
                windows.append((started, time.perf_counter(), action))
                await asyncio.sleep(args.gap)
            stop.set()
            await asyncio.gather(*users)
            metrics = (await client.get("/metrics")).text
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def overlaps(r: dict) -> bool:
        return any(r["start"] < end and r["end"] > start for start, end, _ in windows)

    near = [r for r in results if overlaps(r)]
    far = [r for r in results if not overlaps(r)]
    swaps = swap_figures(metrics)

    def summary(rows: list[dict]) -> dict[str, float]:
        lat = [r["end"] - r["start"] for r in rows] or [0.0]
        ttft = [r["ttft"] for r in rows] or [0.0]
        return {
            "requests": len(rows),
            "failed": sum(not r["ok"] for r in rows),
            "latency_p50_s": statistics.median(lat),
            "latency_p99_s": percentile(lat, 0.99),
            "ttft_p50_s": statistics.median(ttft),
            "ttft_max_s": max(ttft),
        }

    return {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "enforce_eager": args.enforce_eager,
        "concurrency": args.concurrency,
        "startup_s": startup,
        "canary_engine_start_s": canary_start,
        "admin_call_s": {a: round(e - s, 3) for s, e, a in windows} | {"all": [round(e - s, 3) for s, e, _ in windows]},
        "swap_closed_s": {slot: v.get("sum", 0) / max(v.get("count", 1), 1) for slot, v in swaps.items()},
        "swaps": {slot: int(v.get("count", 0)) for slot, v in swaps.items()},
        "overlapping_a_swap": summary(near),
        "not_overlapping": summary(far),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=6, help="canary-slot swaps (rollback/canary), then a promote")
    parser.add_argument("--gap", type=float, default=8.0, help="seconds of steady load between swaps")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server.log, registry)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    exit_on_sigterm()  # stopped from outside: still stop the server (`with` blocks)
    figures = asyncio.run(run(args))
    print(json.dumps(figures, indent=2))
    near, far = figures["overlapping_a_swap"], figures["not_overlapping"]
    print(f"\n{'':<22}{'overlapping a swap':>20}{'not overlapping':>18}")
    for key in ("requests", "failed", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_max_s"):
        print(f"{key:<22}{near[key]:>20.3f}{far[key]:>18.3f}")
    print(f"swap closed time (s): {figures['swap_closed_s']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
