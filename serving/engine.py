"""An engine slot: one vLLM AsyncLLM serving one policy version. Knows nothing of HTTP or gRPC."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heed.hardware import engine_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    dtype: str = "auto"
    enforce_eager: bool = False
    max_num_seqs: int = 64
    seed: int = 0


class EngineSlot:
    """A named slot ("stable", later "canary") holding a running engine and its tokenizer."""

    def __init__(self, name: str, model: Path | str, policy_version: str, settings: EngineSettings) -> None:
        self.name = name
        self.model = model
        self.policy_version = policy_version
        self.settings = settings
        self.engine: Any = None
        self.tokenizer: Any = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def start(self) -> None:
        """Build the engine (blocking, tens of seconds on the CPU): call it from a thread."""
        # The CPU build reads its KV cache size from the environment; GPU builds ignore it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_gib))
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model))
        args = AsyncEngineArgs(
            model=str(self.model),
            tokenizer=str(self.model),
            served_model_name=self.policy_version,
            max_model_len=self.settings.max_model_len,
            dtype=engine_dtype(self.settings.dtype),  # type: ignore[arg-type]  # checked against DTYPES
            max_num_seqs=self.settings.max_num_seqs,
            enforce_eager=self.settings.enforce_eager,
            seed=self.settings.seed,
            disable_log_stats=True,
            enable_log_requests=False,
        )
        log.info("starting engine slot %r on %s (policy version %s)", self.name, self.model, self.policy_version)
        self.engine = AsyncLLM.from_engine_args(args)
        log.info("engine slot %r is ready", self.name)

    async def generate(self, prompt_token_ids: list[int], sampling: Any, request_id: str) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), sampling, request_id):
            yield output

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
