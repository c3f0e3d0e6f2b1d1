"""What every stage runs on: the device (CPU or a CUDA GPU), seeding, bf16 autocast, torchrun/DDP
set-up (gloo on the CPU, NCCL on GPUs), LoRA, checkpoints that a stage can resume from, and the
memory a PPO stage will need."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import resource
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from heed.datadir import atomic_folder, restore_folder
from heed.hardware import native_bf16
from heed.registry import ADAPTER_TARGETS
from training import threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """This process's place in a (possibly one-process) job; torchrun sets the environment."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items`` (every rank gets the same count, so steps line up)."""
        if not self.distributed:
            return items
        usable = len(items) - len(items) % self.world_size
        return items[self.rank : usable : self.world_size]

    def wrap(
        self, model: torch.nn.Module, sharding: str = "ddp", whole: Sequence[torch.nn.Parameter] = ()
    ) -> torch.nn.Module:
        """When launched by torchrun with several processes: DistributedDataParallel (``ddp``:
        each process holds the whole model), or FSDP2 (``fsdp``: ``shard``, in place, ``whole``
        left out of the shards)."""
        if not self.distributed:
            return model
        if sharding == "fsdp":
            return shard(model, self, whole)
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch of tensors on this process's device (as it is on the CPU)."""
        if self.device.type == "cpu":
            return batch
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def mean(self, value: float) -> float:
        """The average of a metric over all ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(setting: str = "cpu") -> torch.device:
    """The device a stage's ``device`` setting names: ``auto`` is this process's GPU (torchrun's
    LOCAL_RANK) where CUDA is, else the CPU; ``cuda`` is this process's GPU; ``cuda:N`` GPU N.
    Asking for a GPU that is not there is a ValueError that says so."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ValueError(f"device must be {DEVICES}; got {setting!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device must be {DEVICES}; got {setting!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} was asked for, but this machine has no CUDA GPU (use cpu or auto)")
    index = local_rank if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"device cuda:{index} was asked for, but this machine has {count} CUDA GPU{'s' * (count != 1)}"
        )
    return torch.device("cuda", index)


SHARDINGS = ("ddp", "fsdp")


def shard(model: torch.nn.Module, rt: Runtime, whole: Sequence[torch.nn.Parameter] = ()) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) over the job's processes: each decoder layer (a transformers
    model's ``_no_split_modules``) a group of its own, the rest (embeddings, tied output layer,
    final norm) the root's. Parameters, gradients and optimizer state are split across the ranks;
    a layer's weights are gathered for its forward and backward only. ``whole``: parameters kept
    out of the shards (scalars, which FSDP2 refuses); their gradients are the caller's to average
    (``average_gradients``). Returns ``model``, sharded in place; build its optimizer after.
    FSDP2 does not broadcast weights as DDP does: rank 0's are sent first, so every rank starts
    from them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: {type(model).__name__} names no decoder layers to shard (_no_split_modules)")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(whole) or None)
    return model


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average ``parameters``' gradients over the ranks (those a sharded model keeps whole): one
    all-reduce, in the order given (the same on every rank: a list, never a set)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    start = 0
    for p, g in zip(parameters, grads, strict=True):
        p.grad = flat[start : start + g.numel()].view_as(g).clone()
        start += g.numel()


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes a sharded model's mix of sharded (DTensor) and whole
    gradients: the norm over both, each clipped by it. Returns the total norm."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    sharded_norm: Any = torch.nn.utils.get_total_norm([p.grad for p in sharded if p.grad is not None])
    norms = [sharded_norm.full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain if p.grad is not None]).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def adamw(params: Iterable[Any], **options: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it can run: every parameter a plain (not sharded)
    floating-point tensor on a device with the kernel (the CPU among them). Else torch's own pick
    (on the CPU a loop over the tensors). The same algorithm; on the bundled 135M's 134.5M fp32
    parameters a step takes 0.09-0.11 s fused against 0.31-0.33 s with torch's default on 2 cores
    (docs/training.md, "The optimizer's step"). A resumed run keeps this choice
    (``load_checkpoint``)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    def listed(ps: Any) -> list[Any]:  # a group's params may be one tensor or any iterable
        return [ps] if isinstance(ps, torch.Tensor) else list(ps)

    groups = [{**g, "params": listed(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = set(_get_fused_kernels_supported_devices())
    fused = bool(tensors) and all(
        not isinstance(p, DTensor) and p.is_floating_point() and p.device.type in devices for p in tensors
    )
    return torch.optim.AdamW(groups, fused=fused or None, **options)


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """A sharded model's whole state dict in host memory on rank 0 (empty on the others): a
    collective, every rank calls it. A model that is not sharded gives its own."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are (a wrapped model's too): where its inputs must go."""
    return next(model.parameters()).device


def is_sharded(model: Any) -> bool:
    """Whether ``model`` was sharded by ``shard`` (an FSDP2 module)."""
    return hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard")


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for a job on ``device``: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def start(seed: int, device: str = "cpu") -> Runtime:
    """Join the torchrun job if there is one (gloo on the CPU, NCCL on GPUs), put this process
    on its device and seed every generator."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    where = resolve_device(device)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(where))
    seed_everything(seed + rank)
    return Runtime(rank=rank, world_size=world_size, device=where)


def sync(model: Any, now: bool) -> contextlib.AbstractContextManager[Any]:
    """Inside, a DDP or FSDP2 model's backward reduces gradients across ranks only when ``now``
    (else they just accumulate locally): a no-op for a model that is not wrapped."""
    if now:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _no_gradient_sync(model)
    if not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


@contextlib.contextmanager
def _no_gradient_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model: Any) -> Any:
    """The model inside a DDP wrapper (anything else is returned as is)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(model, torch.nn.Module) and isinstance(inner, torch.nn.Module) else model


def use_bf16(setting: bool | None, device: torch.device = torch.device("cpu")) -> bool:
    """A stage's ``bf16`` option: on, off, or (None) on where the hardware makes it pay: a GPU
    that computes in bf16, or a CPU with native bf16."""
    if setting is not None:
        return setting
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16()


def autocast(enabled: bool, device: torch.device = torch.device("cpu")) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device``'s type, master weights fp32: on a CPU with native bf16 about
    1.8x the fp32 speed."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def load_causal_lm(folder: Path | str, trainable: bool, bf16: bool = False) -> Any:
    """A causal LM in fp32 for training, or frozen (in bf16 if asked): reference models need no
    gradients."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 and not trainable else torch.float32
    model = threads.watch(AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype))
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def add_lora(model: Any, r: int, alpha: int = 16) -> Any:
    """Wrap ``model`` with LoRA adapters on the attention and MLP projections (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted(ADAPTER_TARGETS),  # what the registry's contract lets an adapter change
    )
    return get_peft_model(model, config)


def lora_rank(model: Any) -> int:
    """The largest rank of ``model``'s LoRA adapters (its ``rank_pattern`` included); 0 for a
    model without any."""
    configs = getattr(unwrap(model), "peft_config", {})
    return max((max([c.r, *c.rank_pattern.values()]) for c in configs.values()), default=0)


def save_causal_lm(model: Any, tokenizer: Any, dest: Path, write: bool = True) -> Path:
    """Save a plain Hugging Face folder (LoRA merged in) that replaces ``dest`` whole. A sharded
    model is gathered first, a collective: every rank calls this, and the one with ``write`` saves."""
    if is_sharded(model):
        from transformers import AutoModelForCausalLM

        full = full_state_dict(model)
        if write:
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(model.config)
            plain.load_state_dict(full, assign=True)
            plain.tie_weights()  # the gathered output layer is a copy of the embeddings: tied again
            plain.generation_config = model.generation_config  # its EOS ids and sampling defaults
            with atomic_folder(dest) as tmp:
                plain.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        return dest
    if not write:
        return dest
    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def load_lora(model: Any, adapter_dir: Path | str, trainable: bool) -> Any:
    """``model`` with the peft LoRA adapter in ``adapter_dir`` applied (its rank and targets)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merged_lora(base_dir: Path | str, adapter_dir: Path | str) -> Any:
    """The frozen fp32 model of ``base_dir`` with the adapter merged into its weights."""
    return load_lora(load_causal_lm(base_dir, trainable=False), adapter_dir, trainable=False).merge_and_unload()


def save_adapter(model: Any, dest: Path) -> Path:
    """Save a peft model's adapter alone (``adapter_config.json``, ``adapter_model.safetensors``;
    not the embeddings) as a folder that replaces ``dest`` whole."""
    with atomic_folder(dest) as tmp:
        unwrap(model).save_pretrained(tmp, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card template
    return dest


def merge_adapter(base_dir: Path | str, adapter_dir: Path | str, dest: Path) -> Path:
    """The full-weight model of a peft LoRA adapter on ``base_dir``, saved as a plain Hugging Face
    folder (with the base's tokenizer and generation config) that replaces ``dest`` whole."""
    from transformers import AutoTokenizer

    return save_causal_lm(merged_lora(base_dir, adapter_dir), AutoTokenizer.from_pretrained(str(base_dir)), dest)


# ---- checkpoints ---------------------------------------------------------------------------------


def _full_states(modules: dict[str, Any]) -> dict[str, Any]:
    """Each module's state dict, whole: a sharded model's and its optimizer's gathered (on every
    rank: a collective; the full dicts land on rank 0, in host memory)."""
    model = next((m for m in modules.values() if is_sharded(m)), None)
    if model is None:
        return {name: unwrap(m).state_dict() for name, m in modules.items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states: dict[str, Any] = {}
    for name, m in modules.items():
        if m is model:
            states[name] = full_state_dict(m)
        elif isinstance(m, torch.optim.Optimizer):
            states[name] = get_optimizer_state_dict(model, m, options=options)
        else:
            states[name] = m.state_dict()
    return states


def save_checkpoint(
    run_dir: Path, step: int, modules: dict[str, Any], extra: dict[str, Any], write: bool = True
) -> Path:
    """Write every state dict (models, optimizers, schedulers) plus RNG states to
    ``run_dir/checkpoint`` atomically; ``extra`` must be JSON (step counters, KL coefficient...).
    With a sharded model every rank calls it (the states are gathered) and the one with ``write``
    writes."""
    dest = run_dir / "checkpoint"
    state = _full_states(modules)
    if not write:
        return dest
    state["rng"] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    with atomic_folder(dest) as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **extra}))
    return dest


def load_checkpoint(run_dir: Path, modules: dict[str, Any]) -> dict[str, Any] | None:
    """Restore what save_checkpoint wrote into ``modules``; None when there is no checkpoint."""
    src = run_dir / "checkpoint"
    restore_folder(src)  # a crash while the last checkpoint replaced the one before
    if not (src / "trainer.json").exists():
        return None
    state = torch.load(src / "state.pt", weights_only=False, map_location="cpu")  # resumable on any device
    model = next((m for m in modules.values() if is_sharded(m)), None)
    for name, m in modules.items():
        if isinstance(m, torch.optim.Optimizer):  # its groups' settings come back, but the kernel is this run's
            for group, saved in zip(m.param_groups, state[name].get("param_groups", []), strict=False):
                saved.update({k: group[k] for k in ("fused", "foreach") if k in group})
        if model is None or not (m is model or isinstance(m, torch.optim.Optimizer)):
            unwrap(m).load_state_dict(state[name])
            continue
        # every rank read the whole file: each keeps its own shards of the full dicts
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if m is model:
            set_model_state_dict(m, state[name], options=options)
        else:
            set_optimizer_state_dict(model, m, state[name], options=options)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    info: dict[str, Any] = json.loads((src / "trainer.json").read_text())
    log.info("resumed from %s at step %d", src, info["step"])
    return info


def batches(items: list[Any], size: int, seed: int, epoch: int) -> Iterator[list[Any]]:
    """``items`` shuffled by (seed, epoch) in batches of ``size``: the same order on a resume."""
    order = list(range(len(items)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    for i in range(0, len(order), size):
        yield [items[j] for j in order[i : i + size]]


# ---- memory --------------------------------------------------------------------------------------

GIB = 2**30


def parameter_counts(folder: Path) -> tuple[int, int]:
    """(parameters of the causal LM, parameters of its body without an untied unembedding), read
    from the safetensors headers without loading any weights."""
    from safetensors import safe_open

    total = unembedding = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = int(np.prod(fh.get_slice(name).get_shape()))
                total += n
                unembedding += n if name.startswith("lm_head.") else 0
    if total == 0:
        raise ValueError(f"{folder}: no *.safetensors weights to count")
    return total, total - unembedding


def ppo_memory_gib(policy: Path, frozen_bf16: bool = False, vllm: bool = False, lora: bool = False) -> dict[str, float]:
    """A rough estimate of a PPO stage's resident memory, in GiB, by part: fp32 weights (4 bytes
    per parameter), gradients (4) and AdamW moments (8) for the policy and the value model, the
    frozen reference and reward model (2 bytes each in bf16), vLLM's copy of the policy, and a
    margin for activations and the runtime (25% plus 1 GiB; a guess, not a measurement). With
    ``lora`` the policy's body is frozen: its weights only (an adapter's gradients and moments are
    about 1% of them at rank 8)."""
    params, body = parameter_counts(policy)
    frozen = 2 if frozen_bf16 else 4
    parts = {
        "policy": (4.2 if lora else 16) * params / GIB,
        "value_model": 16 * body / GIB,
        "reference": frozen * params / GIB,
        "reward_model": frozen * body / GIB,
    }
    if vllm:
        parts["vllm_engine"] = 4 * params / GIB + 1.0  # its weights and a small KV cache
    parts["activations_and_runtime"] = 0.25 * sum(parts.values()) + 1.0
    return {**parts, "total": sum(parts.values()), "parameters": float(params)}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2)
