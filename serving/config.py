"""The service's configuration (`heed serve` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from heed.config import option
from heed.datadir import EVENT_LOG_DEFAULT, EVENT_LOG_HELP, REGISTRY_DEFAULT, REGISTRY_HELP, default_data_dir


@dataclass(frozen=True)
class ServeConfig:
    model: str = option("", "a Hugging Face model folder (or hub id); empty: the bundled SmolLM2-135M-Instruct")
    policy_version: str = option("", "the version name completions are logged under; empty: the folder's name")
    served_model_name: str = option("heed", "the alias clients may send as `model` to let the service choose")
    data_dir: Path = option(default_data_dir(), "the data directory: events.db, registry/, rollout.json, trainer/")
    event_log: str = option(EVENT_LOG_DEFAULT, EVENT_LOG_HELP)
    registry: str = option(REGISTRY_DEFAULT, REGISTRY_HELP)
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0 for all)")
    allow_open: bool = option(
        False,
        "serve without API keys on a --host other than loopback (anyone who can reach it may use it); "
        "without keys heed otherwise listens on loopback only",
    )
    http_port: int = option(8000, "HTTP port (OpenAI-compatible API, /metrics, /health)")
    grpc_port: int = option(50051, "gRPC port (heed.v1.Completions, heed.v1.Feedback, health, reflection)")
    api_keys_file: Path | None = option(
        None, 'TOML file with a [keys] table: principal = "key" (also: $HEED_API_KEYS="principal:key,...")'
    )
    max_model_len: int = option(2048, "context length served (prompt + completion tokens)")
    kv_cache_gib: int = option(2, "KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE on the CPU)")
    dtype: str = option("auto", "weights dtype: auto = the checkpoint's, but float32 on a CPU without native bf16")
    enforce_eager: bool = option(False, "skip torch.compile: starts ~4x faster, generates ~20% slower")
    # ---- GPUs (unused on the CPU; checked together at start-up: heed/gpu.py)
    gpu_memory_utilization: float = option(
        0.45, "on a GPU: the stable slot's share of each GPU's memory (vLLM's gpu_memory_utilization)"
    )
    canary_gpu_memory_utilization: float = option(0.3, "on a GPU: the canary slot's share of each GPU's memory")
    trainer_gpu_memory_utilization: float = option(
        0.15,
        "on a GPU, with --with-trainer: the trainer's vLLM rollout engine's share of each GPU's memory (given to"
        " the trainer as its rollout_gpu_memory_utilization); the three shares must add up to at most 0.95",
    )
    tensor_parallel_size: int = option(1, "GPUs each engine slot spans (vLLM's tensor_parallel_size)")
    max_num_seqs: int = option(64, "the most sequences the engine runs at once")
    otlp_traces_endpoint: str = option(
        "",
        "export OpenTelemetry spans over OTLP gRPC to this collector (e.g. http://127.0.0.1:4317): a completion's"
        " request, queue, generation and log write under the caller's traceparent, and vLLM's engine spans; empty: off",
    )
    engine_stats: bool = option(
        False,
        "each engine slot's figures on /metrics (heed_engine_*): vLLM's per-step stats, which cost about 4% of"
        " throughput and 15% of p99 on 2 cores (docs/benchmarks.md)",
    )
    tool_call_parser: str = option(
        "",
        "vLLM's tool parser for tool_choice auto, as vLLM's --tool-call-parser (hermes, llama3_json, mistral, ...):"
        " the calls the model writes in its own syntax are returned as tool_calls; empty: an auto answer is text",
    )
    seed: int = option(0, "the engine's random seed")
    max_n: int = option(16, "the largest `n` (choices per request) accepted")
    max_in_flight: int = option(256, "completions in flight at once, both APIs; more get 503 `overloaded` at once")
    max_connections: int = option(
        1024,
        "HTTP requests and gRPC calls in flight at once; more are refused at once (HTTP 503 with Retry-After, gRPC"
        " RESOURCE_EXHAUSTED). HTTP health probes are not held; /metrics and /admin/ calls have 64 places of their own",
    )
    max_body_bytes: int = option(1 << 20, "the largest request body accepted, in bytes")
    cache_dir: Path | None = option(
        None, "where prepared models are cached (default: $HEED_CACHE_DIR or ~/.cache/heed)"
    )
    pin_principals: tuple[str, ...] = option(
        (),
        "API key principals that may ask for a specific policy version (`model` = a version, or the "
        "X-Heed-Policy-Version header); others get the rollout's split. Without API keys (local use) anyone may",
    )
    user_principals: tuple[str, ...] = option(
        (),
        "API key principals trusted to name their end users (`user`): each user such a key names is a caller "
        "of its own in the evidence the canary and the trainer weigh (one vote, one share). Another key is one "
        "caller whatever `user` it sends (the `user` is still logged). Without API keys (local use) every "
        "`user` counts",
    )
    # ---- the loop: admin, registry, hot swap, canary rollout, co-located trainer
    admin_keys_file: Path | None = option(
        None, 'TOML file with an [admin_keys] table: name = "key" (also: $HEED_ADMIN_KEYS="name:key,...")'
    )
    registry_poll_s: float = option(2.0, "how often to look for newly published versions to canary (0: never)")
    rollout_interval_s: float = option(2.0, "how often the rollout controller judges the canary")
    canary_steps: tuple[float, ...] = option(
        (5.0, 25.0, 50.0, 100.0), "canary traffic shares in percent, step by step; reaching 100 promotes"
    )
    min_feedback_per_step: int = option(50, "thumbs on the canary a step needs before the controller decides")
    max_feedback_per_step: int = option(
        2000,
        "roll back a canary whose step is still undecided after this many thumbs on it (or"
        " --min-feedback-per-step, where that is more): thumbs too even to tell the versions apart end the"
        " rollout instead of holding it for --max-canary-hours, and the rule looks a bounded number of times."
        " A real gain under about 3 points of thumbs-up rate is often rolled back by 2000 (docs/loop.md); 0: no cap",
    )
    advance_probability: float = option(0.95, "advance when P(canary thumbs-up rate > stable's) reaches this")
    rollback_probability: float = option(0.95, "roll back when P(canary thumbs-up rate < stable's) reaches this")
    max_canary_error_rate: float = option(0.05, "roll back at once when the canary's server-error rate exceeds this")
    max_canary_hours: float = option(
        24.0,
        "roll back a canary whose step is still undecided this many hours after it started, advanced or was "
        "resumed (too little or too even evidence: the trainer waits for the decision); 0: never",
    )
    max_caller_share: float = option(
        0.25,
        "the most of a version's thumbs one caller (API key and the end user it names) may carry: a caller "
        "with more is weighed down to it; 1 turns the cap off",
    )
    policy_mode: Literal["full", "adapter"] = option(
        "full",
        "full: every version is a whole model, stable and canary each in an engine of their own; adapter: versions"
        " are LoRA adapters of one base model, all served by one vLLM engine (stable, canary, the previous stable"
        " and the base resident at once); a new version goes live without a swap, and the trainer trains adapters",
    )
    max_lora_rank: int = option(8, "adapter mode: the largest adapter rank served (1, 8, 16, 32, 64, 128, 256)")
    max_loras: int = option(3, "adapter mode: the most distinct adapters in one engine batch (vLLM's max_loras)")
    max_cpu_loras: int = option(
        5, "adapter mode: the most adapters resident in the engine (vLLM's max_cpu_loras; at least --max-loras)"
    )
    canary_slot: Literal["warm", "lazy"] = option(
        "warm",
        "warm: start the canary engine on stable in the background once serving (when the server is idle, at "
        "the lowest CPU priority), so a new version goes live by a swap; lazy: start it when the first canary "
        "arrives (less memory)",
    )
    canary_warm_idle_s: float = option(
        2.0,
        "the warm canary slot starts once no request has been in flight for this long (0: at once); under "
        "steady load it waits, and a canary that comes first starts its own engine",
    )
    swap_drain_timeout_s: float = option(60.0, "how long a swap waits for in-flight requests on the old weights")
    swap_wait_timeout_s: float = option(30.0, "how long a new request waits for a swap to end before a 503")
    with_trainer: bool = option(False, "also run `heed trainer` on this data directory, at a lower CPU priority")
