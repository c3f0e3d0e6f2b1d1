"""The service's configuration (`heed serve` flags are generated from these fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from heed.config import option


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "heed"


@dataclass(frozen=True)
class ServeConfig:
    model: str = option("", "a Hugging Face model folder (or hub id); empty: the bundled SmolLM2-135M-Instruct")
    policy_version: str = option("", "the version name completions are logged under; empty: the folder's name")
    served_model_name: str = option("heed", "the alias clients may send as `model` to let the service choose")
    data_dir: Path = option(default_data_dir(), "where the event log (events.db) lives")
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0 for all)")
    http_port: int = option(8000, "HTTP port (OpenAI-compatible API, /metrics, /health)")
    grpc_port: int = option(50051, "gRPC port (heed.v1.Completions, heed.v1.Feedback, health, reflection)")
    api_keys_file: Path | None = option(
        None, 'TOML file with a [keys] table: principal = "key" (also: $HEED_API_KEYS="principal:key,...")'
    )
    max_model_len: int = option(2048, "context length served (prompt + completion tokens)")
    kv_cache_gib: int = option(2, "KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE on the CPU)")
    dtype: str = option("auto", "weights dtype: auto = the checkpoint's, but float32 on a CPU without native bf16")
    enforce_eager: bool = option(False, "skip torch.compile: starts ~4x faster, generates ~20% slower")
    max_num_seqs: int = option(64, "the most sequences the engine runs at once")
    seed: int = option(0, "the engine's random seed")
    max_n: int = option(16, "the largest `n` (choices per request) accepted")
    max_body_bytes: int = option(1 << 20, "the largest request body accepted, in bytes")
    cache_dir: Path | None = option(
        None, "where prepared models are cached (default: $HEED_CACHE_DIR or ~/.cache/heed)"
    )
