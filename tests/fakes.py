"""A fake vLLM engine for the fast test layer: the service core (completion and feedback
services, router, slots, rollout controller) runs for real around it, with a real tokenizer, a
real SQLite event log and a real registry. The engine keeps its own real tests (tests/serving,
tests/loop); these are about the service's logic.

``FakeEngine`` answers like vLLM's AsyncLLM: ``generate`` yields RequestOutput-shaped objects
(FINAL_ONLY: one output with everything; DELTA: one per token), ``pause_generation``,
``collective_rpc("reload_weights")``, ``reset_prefix_cache`` and ``resume_generation`` are
recorded. Each version answers with its own tokens, so a test can tell which version answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from serving.engine import EngineSettings, EngineSlot
from serving.requests import GenerationRequest


@dataclass
class FakeSampling:
    n: int
    max_tokens: int
    stream: bool
    logprobs: int | None


@dataclass
class FakeEngine:
    """What EngineSlot calls on vLLM's AsyncLLM."""

    slot: EngineSlot
    fail: bool = False  # every generate raises (a server-side failure)
    delay_s: float = 0.0  # per token
    errored: bool = False
    calls: list[str] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)

    loras: dict[int, Any] = field(default_factory=dict)  # adapter mode: the resident LoRARequests by id
    refuse_lora: bool = False  # add_lora raises (files vLLM cannot load)

    def answer(self, index: int, max_tokens: int, version: str | None = None) -> list[int]:
        """The token ids choice ``index`` gets: they name the version and the choice."""
        base = 100 + 10 * (sum(map(ord, version or self.slot.policy_version)) % 50)
        return [base + index, base + index + 1, base + index + 2][:max_tokens]

    async def add_lora(self, request: Any) -> bool:
        self.calls.append(f"add_lora:{request.lora_name}")
        if self.refuse_lora:
            raise ValueError(f"cannot load the adapter at {request.lora_path}")
        self.loras[request.lora_int_id] = request
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(f"remove_lora:{self.loras[lora_id].lora_name}")
        return self.loras.pop(lora_id, None) is not None

    async def generate(
        self,
        prompt: dict[str, Any],
        sampling: FakeSampling,
        request_id: str,
        trace_headers: Any = None,
        lora_request: Any = None,
    ) -> AsyncIterator[Any]:
        self.prompts.append(list(prompt["prompt_token_ids"]))
        if self.fail:
            raise RuntimeError("the engine failed")
        if lora_request is not None and self.loras.get(lora_request.lora_int_id) != lora_request:
            raise ValueError(f"adapter {lora_request.lora_name} is not resident")  # heed adds before it routes
        version = lora_request.lora_name if lora_request is not None else None
        answers = [self.answer(i, sampling.max_tokens, version) for i in range(sampling.n)]
        if not sampling.stream:
            await asyncio.sleep(self.delay_s * sampling.max_tokens)
            yield _output(
                [_choice(self.slot.tokenizer, i, ids, "length", sampling.logprobs) for i, ids in enumerate(answers)]
            )
            return
        for t in range(max(len(a) for a in answers)):
            await asyncio.sleep(self.delay_s)
            outs = []
            for i, ids in enumerate(answers):
                if t < len(ids):
                    finish = "length" if t == len(ids) - 1 else None
                    outs.append(_choice(self.slot.tokenizer, i, ids[t : t + 1], finish, sampling.logprobs))
            yield _output(outs)

    async def pause_generation(self, mode: str = "wait", clear_cache: bool = True) -> None:
        self.calls.append(f"pause:{mode}")

    async def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> None:
        self.calls.append(f"{method}:{Path((kwargs or {})['weights_path']).name}")

    async def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")

    async def resume_generation(self) -> None:
        self.calls.append("resume")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def _choice(tokenizer: Any, index: int, ids: list[int], finish: str | None, logprobs: int | None) -> Any:
    entries = None
    if logprobs is not None:
        entries = [{t: SimpleNamespace(logprob=-0.5, rank=1, decoded_token=tokenizer.decode([t]))} for t in ids]
    return SimpleNamespace(
        index=index, text=tokenizer.decode(ids), token_ids=list(ids), finish_reason=finish, logprobs=entries
    )


def _output(outputs: list[Any]) -> Any:
    return SimpleNamespace(outputs=outputs)


class FakeSlot(EngineSlot):
    """A real EngineSlot (leases, swaps, drains) over a FakeEngine and a real tokenizer."""

    def __init__(
        self,
        name: str,
        model: Path,
        policy_version: str,
        tokenizer: Any,
        weights_dir: Path | None = None,
        settings: EngineSettings | None = None,
    ) -> None:
        super().__init__(name, model, policy_version, settings or EngineSettings(max_model_len=256), weights_dir)
        self._fake_tokenizer = tokenizer

    def start(self, background: bool = False) -> None:
        self.tokenizer = self._fake_tokenizer
        self.engine = FakeEngine(self)

    def sampling(self, r: GenerationRequest, max_tokens: int, skip_special_tokens: bool = True) -> Any:
        return FakeSampling(r.n, max_tokens, r.stream, r.logprobs)


def policy_folder(path: Path, marker: float = 0.0) -> Path:
    """A folder that passes the registry's and the swap's checks: config.json and tiny weights."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2, "vocab_size": 4, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.full((4, 2), marker)}, str(path / "model.safetensors"))
    return path
