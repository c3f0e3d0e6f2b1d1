"""PPO's sampling (its rollouts): one response per prompt from the current policy, with vLLM (the
trainer's own engine, its weights refreshed from the trained policy every iteration) or, as the
fallback, with ``transformers.generate`` on the training model itself."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from heed.gpu import GpuShare, check_gpu_shares, gpu_count
from heed.models import with_output_layer
from heed.registry import lora_engine_args
from training import runtime
from training.data import pad

log = logging.getLogger(__name__)


class Sampler(Protocol):
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        """One sampled response (token ids, up to and including EOS) per prompt."""
        ...

    def refresh(self, policy: Any) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights."""
        ...

    def close(self) -> None: ...


def _cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


class HFSampler:
    """Sampling with ``generate`` on the policy being trained (no copy, nothing to refresh)."""

    def __init__(self, policy: Any, pad_id: int, eos_id: int, batch_size: int = 64) -> None:
        self.policy, self.pad_id, self.eos_id, self.batch_size = policy, pad_id, eos_id, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        model = runtime.unwrap(self.policy)
        was_training = model.training
        model.eval()
        device = runtime.model_device(model)
        responses: list[list[int]] = []
        for i in range(0, len(prompts), self.batch_size):
            ids, mask = pad(prompts[i : i + self.batch_size], self.pad_id, left=True)
            ids, mask = ids.to(device), mask.to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
            )
            responses += [_cut_at_eos(row.tolist(), self.eos_id) for row in out[:, ids.shape[1] :]]
        model.train(was_training)
        return responses

    def refresh(self, policy: Any) -> None:
        self.policy = policy

    def close(self) -> None:
        pass


def policy_state_dict(policy: Any) -> dict[str, torch.Tensor]:
    """The policy's weights under Hugging Face names, LoRA merged, with ``lm_head.weight`` written
    out (``heed.models.with_output_layer``)."""
    model = runtime.unwrap(policy)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return with_output_layer(state, tied=bool(getattr(model.config, "tie_word_embeddings", False)))


# How the trained weights reach the rollout engine (PPOConfig.weight_transfer).
WEIGHT_TRANSFERS = ("auto", "ipc", "disk")


def weight_transfer_backend(setting: str, device: torch.device, distributed: bool = False) -> str:
    """``ipc`` (vLLM's native transfer over CUDA IPC: the engine reads the trainer's GPU tensors in
    place, nothing is copied through the host) or ``disk`` (a safetensors file and vLLM's
    ``reload_weights``: the CPU's path, and the fallback). ``auto`` is ipc when the policy trains
    on a GPU (``device``) in one process. The rollout engine shares the training step's GPU
    (heed/gpu.py), which is what IPC needs; vLLM's NCCL transfer is for an engine on other GPUs,
    which heed does not place. Under torchrun each rank's transfer joins collectives of the whole
    job, so one rank falling back to the file alone would leave the others waiting: the file."""
    if setting not in WEIGHT_TRANSFERS:
        raise ValueError(f"weight_transfer must be one of {', '.join(WEIGHT_TRANSFERS)}; got {setting!r}")
    if setting == "ipc" and device.type != "cuda":
        raise ValueError(
            f"weight_transfer ipc needs the policy on a CUDA GPU (vLLM's CUDA IPC); it trains on {device}: "
            "use auto or disk"
        )
    if setting == "ipc" and distributed:
        raise ValueError("weight_transfer ipc runs in one process, not under torchrun: use auto or disk")
    if setting == "auto":
        return "ipc" if device.type == "cuda" and not distributed else "disk"
    return setting


class LLMWeightClient:
    """An in-process ``vllm.LLM`` as the client vLLM's trainer-side transfer engines drive
    (``VLLMWeightSyncClient``): they pass bare dicts, which ``LLM`` takes wrapped."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: Any) -> None:  # a dict, or a list of them (packed chunks)
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class StateDictSource:
    """The weights one transfer sends: a policy's state dict under Hugging Face names, LoRA merged
    and ``lm_head.weight`` written out (``policy_state_dict``; vLLM's ``ModuleSource`` would walk
    ``named_parameters``, which leaves a tied output layer out). ``metadata`` and iteration agree
    element for element, as vLLM's engines require. Subclasses vLLM's ``WeightSource`` when
    built by ``weight_source`` (vLLM is imported only there)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def metadata(self) -> list[Any]:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.state.items()]

    def __iter__(self) -> Any:
        return iter(list(self.state.items()))


def weight_source() -> StateDictSource:
    """A ``StateDictSource`` that is a vLLM ``WeightSource`` (its default group methods)."""
    from vllm.distributed.weight_transfer.base import WeightSource

    class Source(StateDictSource, WeightSource):
        pass

    return Source()


# The ranks vLLM's engine takes as its max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM takes that holds an adapter of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


class VLLMSampler:
    """A vLLM engine owned by the trainer. Build it only under ``if __name__ == "__main__":``
    (its workers are spawned). On a GPU its weights are refreshed through vLLM's CUDA IPC weight
    transfer (``weight_transfer_backend``); on the CPU, or if that fails, through a file.

    With ``lora_rank`` (PPO training a LoRA adapter on ``model_dir``), the engine serves the base
    with LoRA, and a refresh hands it the adapter alone: saved as a peft folder (kilobytes to
    megabytes, not the merged model's whole state dict) and loaded under a new id, so that no
    stale weights sit under a reused name; the engine's CPU cache (2) drops the one before."""

    def __init__(
        self,
        model_dir: Path | str,
        eos_id: int,
        seed: int,
        max_model_len: int = 1024,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.15,
        weight_transfer: str = "auto",
        policy_device: torch.device = torch.device("cpu"),
        distributed: bool = False,
        lora_rank: int = 0,
    ) -> None:
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        check_gpu_shares([GpuShare("rollout engine", "rollout_gpu_memory_utilization", gpu_memory_utilization)], 0)
        self.transfer = weight_transfer_backend(weight_transfer, policy_device, distributed)
        extra: dict[str, Any] = {}
        if self.transfer == "ipc":
            from vllm.config import WeightTransferConfig

            # The IPC handles carry torch types through vLLM's msgpack channel to its engine process,
            # which decodes them only with this set (its child inherits it).
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            extra["weight_transfer_config"] = WeightTransferConfig(backend="ipc")
        if lora_rank > 0:  # the policy's one adapter (and the one it replaces)
            extra |= lora_engine_args(vllm_lora_rank(lora_rank), max_loras=1, max_cpu_loras=2)
        self.lora_rank = lora_rank
        self._lora: Any = None  # the adapter the next generate samples with (a vllm LoRARequest)
        self._refreshes = 0
        self._sender: Any = None  # vLLM's trainer-side IPC engine, built at the first refresh
        self._source: StateDictSource | None = None
        self.eos_id, self.seed = eos_id, seed
        self.llm = LLM(
            model=str(model_dir),
            enforce_eager=True,
            seed=seed,
            max_model_len=max_model_len,
            dtype=dtype,  # type: ignore[arg-type]  # a name vLLM checks: float32, bfloat16...
            enable_prefix_caching=False,  # cached KV would have been computed with the old weights
            # On a GPU, its share beside the training step (heed/gpu.py); on the CPU vLLM would read
            # it as a share of the machine's memory to reserve, so it keeps vLLM's own sizing there.
            gpu_memory_utilization=gpu_memory_utilization if gpu_count() else EngineArgs.gpu_memory_utilization,
            **extra,
        )
        self._weights = Path(tempfile.mkdtemp(prefix="heed-sampling-"))
        # A copy of the policy's weights: removed by close(), else when the sampler is collected or
        # the process exits (a stage that raised, a stopped trainer), not left behind in /tmp.
        self._remove_weights = weakref.finalize(self, shutil.rmtree, self._weights, True)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=max_new_tokens,
            stop_token_ids=[self.eos_id],
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=self._lora
        )
        return [_cut_at_eos(list(o.outputs[0].token_ids), self.eos_id) for o in outputs]

    def refresh(self, policy: Any) -> None:
        rank = runtime.lora_rank(policy)
        if self.lora_rank > 0 and rank > 0 and not runtime.is_sharded(policy):
            if rank > vllm_lora_rank(self.lora_rank):
                raise ValueError(f"the policy's LoRA rank {rank} is above this rollout engine's {self.lora_rank}")
            self._load_adapter(policy)
            return
        self._drop_adapter()  # the merged weights are the whole policy: no adapter on top of them
        state = policy_state_dict(policy)
        if self.transfer == "ipc":
            try:
                self._send(state)
                return
            except Exception as exc:  # a transfer that fails leaves the engine's old weights: use the file
                log.warning("vLLM's IPC weight transfer failed (%s): refreshing through a file from now on", exc)
                self.transfer = "disk"
                self._shutdown_sender()
        self._reload(state)

    def _send(self, state: dict[str, torch.Tensor]) -> None:
        """Hand the engine CUDA IPC handles of ``state``'s tensors (on the trainer's GPU); it loads
        them layer by layer (vLLM's start/update/finish weight update)."""
        if self._sender is None:
            from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            self._source = weight_source()
            self._sender = WeightTransferTrainerFactory.trainer_init(
                IPCTrainerInitInfo(rank=0), client=LLMWeightClient(self.llm), source=cast(Any, self._source)
            )
        assert self._source is not None
        self._source.state = state
        try:
            self._sender.send_weights()
        finally:
            self._source.state = {}

    def _load_adapter(self, policy: Any) -> None:
        """Save the policy's adapter and sample with it from now on; the folder before it was
        loaded by the generate that used it, so it goes."""
        from vllm.lora.request import LoRARequest

        self._refreshes += 1
        folder = runtime.save_adapter(policy, self._weights / f"adapter-{self._refreshes}")
        self._drop_adapter()
        self._lora = LoRARequest(f"policy-{self._refreshes}", self._refreshes, str(folder))

    def _drop_adapter(self) -> None:
        lora, self._lora = self._lora, None
        if lora is not None:
            shutil.rmtree(lora.lora_path, ignore_errors=True)

    def _reload(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.cpu() for k, v in state.items()}, str(self._weights / "model.safetensors"))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._weights)})

    def _shutdown_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.shutdown()

    def close(self) -> None:
        self._shutdown_sender()
        self._remove_weights()
        del self.llm
