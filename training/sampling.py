"""PPO's sampling (its rollouts): one response per prompt from the current policy, with vLLM (the
trainer's own engine, its weights refreshed from the trained policy every iteration) or, as the
fallback, with ``transformers.generate`` on the training model itself."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from heed.gpu import GpuShare, check_gpu_shares, gpu_count
from heed.models import with_output_layer
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
        responses: list[list[int]] = []
        for i in range(0, len(prompts), self.batch_size):
            ids, mask = pad(prompts[i : i + self.batch_size], self.pad_id, left=True)
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


class VLLMSampler:
    """A vLLM engine owned by the trainer. Build it only under ``if __name__ == "__main__":``
    (its workers are spawned)."""

    def __init__(
        self,
        model_dir: Path | str,
        eos_id: int,
        seed: int,
        max_model_len: int = 1024,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.15,
    ) -> None:
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        check_gpu_shares([GpuShare("rollout engine", "rollout_gpu_memory_utilization", gpu_memory_utilization)], 0)
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
        )
        self._weights = Path(tempfile.mkdtemp(prefix="heed-sampling-"))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=max_new_tokens,
            stop_token_ids=[self.eos_id],
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [_cut_at_eos(list(o.outputs[0].token_ids), self.eos_id) for o in outputs]

    def refresh(self, policy: Any) -> None:
        from safetensors.torch import save_file

        save_file(policy_state_dict(policy), str(self._weights / "model.safetensors"))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._weights)})

    def close(self) -> None:
        shutil.rmtree(self._weights, ignore_errors=True)
        del self.llm
