"""The device a training stage runs on (training/runtime.py): what a setting resolves to, the
backend a torchrun job joins over, bf16 by device, and the errors, checked on the CPU (the GPU
path itself needs a GPU: docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.hardware import native_bf16
from training import runtime
from training.config import SFTConfig
from training.data import Demonstration
from training.sft import train_sft

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


def test_auto_is_this_processs_gpu_where_there_is_one_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert runtime.resolve_device("auto") == expected
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_a_clear_error(setting: str) -> None:
    with pytest.raises(ValueError, match=rf"device '{setting}' was asked for, but this machine has no CUDA GPU"):
        runtime.resolve_device(setting)


@pytest.mark.parametrize("setting", ["gpu", "tpu", "mps", "cuda:x", ""])
def test_an_unknown_device_names_the_choices(setting: str) -> None:
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        runtime.resolve_device(setting)


def test_gpus_join_over_nccl_and_cpus_over_gloo() -> None:
    assert runtime.backend_for(torch.device("cuda", 1)) == "nccl"
    assert runtime.backend_for(torch.device("cpu")) == "gloo"


def test_bf16_and_autocast_follow_the_device() -> None:
    cpu = torch.device("cpu")
    assert runtime.use_bf16(None, cpu) == native_bf16()
    assert runtime.use_bf16(False, cpu) is False and runtime.use_bf16(True, cpu) is True
    with runtime.autocast(True, cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_enabled("cuda")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert runtime.Runtime().to_device(batch) is batch  # the CPU's batches stay where they are
    assert runtime.start(0, "cpu").device == cpu


@NO_CUDA
def test_sft_asked_to_run_on_a_gpu_that_is_not_there_stops_before_it_trains(tiny_model: Path, tmp_path: Path) -> None:
    cfg = SFTConfig(model=str(tiny_model), out=tmp_path / "sft", max_steps=1, device="cuda", progress=False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train_sft(cfg, [Demonstration("Hi", "Hello")] * 4)
    assert not (tmp_path / "sft" / "model").exists()


# ---- every stage keeps its tensors where its model is ----------------------------------------------
# The meta device stands in for a GPU here: an operation between a meta tensor and a CPU tensor
# fails as one between a GPU tensor and a CPU tensor does, so a tensor made on the CPU by mistake
# (the bug a CPU-only test never sees) fails these tests.


class TinyLM(torch.nn.Module):
    """A causal LM's interface (logits, loss, logits_to_keep) over an embedding and a linear layer:
    transformers' own models cannot run on the meta device (their masks read values), and what is
    checked here is the stages' code around the model, not the model."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask, logits_to_keep=0, labels=None):  # type: ignore[no-untyped-def]
        logits = self.head(self.embed(input_ids))[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return type("Output", (), {"logits": logits, "loss": loss})


def meta_model(tiny_model: Path) -> torch.nn.Module:
    return TinyLM().to("meta")


def test_the_optimizer_is_torchs_fused_adamw_where_it_can_run_and_steps_as_torchs_default_does() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    trained = {}
    for kind in ("heed", "torch"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        groups = [{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 1e-1}]
        opt = (
            runtime.adamw(groups, weight_decay=0.01) if kind == "heed" else torch.optim.AdamW(groups, weight_decay=0.01)
        )
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        trained[kind] = params
        if kind == "heed":
            assert all(g["fused"] for g in opt.param_groups)  # the CPU has the kernel
    for a, b in zip(trained["heed"], trained["torch"], strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, weights[0] if a.dim() == 2 else weights[1])  # it stepped
    # Where the kernel cannot run (a device without it here; a sharded model's DTensors too),
    # torch's own choice instead of an error.
    assert runtime.adamw([torch.nn.Parameter(torch.zeros(3, device="meta"))]).param_groups[0]["fused"] is None


def test_a_resumed_run_keeps_its_own_choice_of_the_optimizers_kernel(tmp_path: Path) -> None:
    """A checkpoint from before the fused kernel (torch's default), resumed: fused now, and the
    moments and step count come back."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    saved.step()
    runtime.save_checkpoint(tmp_path, 1, {"model": model, "opt": saved}, {})

    resumed = runtime.adamw(model.parameters(), lr=1e-2)
    assert runtime.load_checkpoint(tmp_path, {"model": model, "opt": resumed}) is not None

    assert resumed.param_groups[0]["fused"] and saved.param_groups[0]["fused"] is None
    moments = [resumed.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(m, saved.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters(), strict=True))
    assert float(resumed.state[model.weight]["step"]) == 1
    model(torch.randn(3, 8)).sum().backward()
    resumed.step()  # the fused kernel takes the restored state
    assert float(resumed.state[model.weight]["step"]) == 2


def test_the_reward_models_losses_stay_on_the_rewards_device() -> None:
    from training.reward import FeedbackHead, feedback_loss

    head = FeedbackHead().to("meta")
    raw = torch.zeros(6, device="meta", requires_grad=True)
    labels = [("ranking", (0, 1, 2)), ("thumb", (1,)), ("rated", (5,)), ("correction", (0, 1))]
    weights = {"ranking_weight": 1.0, "thumb_weight": 0.5, "rating_weight": 0.5, "correction_weight": 1.0}

    loss = feedback_loss(raw[:7], labels, head, weights)  # type: ignore[arg-type]

    assert loss.device.type == "meta" and loss.shape == ()


def test_ppo_and_ptx_log_probs_stay_on_the_models_device(tiny_model: Path) -> None:
    from training.ppo import ptx_nll, token_logprobs

    model = meta_model(tiny_model)
    ids = torch.ones(2, 6, dtype=torch.long, device="meta")
    mask = torch.ones_like(ids)

    logp, entropy = token_logprobs(model, ids, mask, temperature=1.0, start=2, with_entropy=True)

    assert logp.device.type == "meta" and entropy is not None and entropy.device.type == "meta"
    cpu_batch = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))  # as pad() makes it
    assert ptx_nll(model, cpu_batch).device.type == "meta"


def test_kto_moves_its_padded_batch_to_the_models_device(tiny_model: Path) -> None:
    from training.kto import answer_logprobs, kto_loss, reference_point

    model = meta_model(tiny_model)
    logp = answer_logprobs(model, [([1, 2, 3], [4, 5]), ([1, 2], [6])], pad_id=0)  # padded on the CPU
    desirable = torch.tensor([True, False], device="meta")

    assert logp.device.type == "meta"
    assert kto_loss(logp, desirable, reference_point(logp, logp), beta=0.1).device.type == "meta"


def test_hf_sampling_moves_its_prompts_to_the_policys_device(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.sampling import HFSampler

    policy = runtime.load_causal_lm(tiny_model, trainable=False)
    seen: list[torch.device] = []
    generate = policy.generate

    def spy(**kwargs):  # the real generate, after noting where its inputs are
        seen.append(kwargs["input_ids"].device)
        return generate(**kwargs)

    monkeypatch.setattr(policy, "generate", spy)
    policy.to = lambda *a, **k: policy  # type: ignore[method-assign]
    HFSampler(policy, pad_id=0, eos_id=2).generate([[1, 2, 3]], max_new_tokens=2, temperature=1.0)

    assert seen == [next(policy.parameters()).device]


# ---- the rollout engine's weight transfer --------------------------------------------------------------


def test_weight_transfer_is_ipc_on_a_gpu_and_a_file_on_the_cpu() -> None:
    from training.sampling import weight_transfer_backend

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert weight_transfer_backend("auto", cpu) == "disk"
    assert weight_transfer_backend("auto", gpu) == "ipc"
    assert weight_transfer_backend("auto", gpu, distributed=True) == "disk"  # every rank the same way
    assert weight_transfer_backend("disk", gpu) == "disk"  # asked for: the file, even on a GPU
    with pytest.raises(ValueError, match="ipc needs the policy on a CUDA GPU"):
        weight_transfer_backend("ipc", cpu)  # a GPU on the host is not enough: the policy's device decides
    with pytest.raises(ValueError, match="not under torchrun"):
        weight_transfer_backend("ipc", gpu, distributed=True)
    with pytest.raises(ValueError, match="one of auto, ipc, disk"):
        weight_transfer_backend("nccl", gpu)


def test_a_lora_rollout_engine_is_sized_for_the_policys_adapter(tiny_model: Path) -> None:
    """The rollout engine's max_lora_rank is the smallest vLLM takes that holds the policy's
    largest adapter rank (its rank_pattern included); a policy without LoRA needs none."""
    from typing import get_args

    from peft import LoraConfig, get_peft_model
    from vllm.config.lora import MaxLoRARanks

    from training.sampling import VLLM_LORA_RANKS, vllm_lora_rank

    assert get_args(MaxLoRARanks) == VLLM_LORA_RANKS  # what this vLLM takes

    policy = runtime.load_causal_lm(tiny_model, trainable=True)
    assert runtime.lora_rank(policy) == 0
    assert runtime.lora_rank(runtime.add_lora(policy, 4)) == 4
    plain = runtime.load_causal_lm(tiny_model, trainable=True)
    patterned = get_peft_model(plain, LoraConfig(r=4, rank_pattern={"q_proj": 12}, target_modules=["q_proj", "v_proj"]))
    assert runtime.lora_rank(patterned) == 12
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 12, 64, 300)] == [1, 8, 8, 16, 16, 64, 320]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_lora_rank(513)


def test_the_ipc_source_declares_what_it_sends_with_the_tied_output_layer(tiny_model: Path) -> None:
    from vllm.distributed.weight_transfer.base import WeightSource

    from training.sampling import policy_state_dict, weight_source

    policy = runtime.load_causal_lm(tiny_model, trainable=True)
    assert policy.config.tie_word_embeddings and "lm_head.weight" not in dict(policy.named_parameters())
    source = weight_source()
    source.state = policy_state_dict(policy)

    metadata = source.metadata()
    sent = list(source)

    assert isinstance(source, WeightSource)
    assert [(m.name, m.dtype, m.shape) for m in metadata] == [(n, t.dtype, tuple(t.shape)) for n, t in sent]
    assert "lm_head.weight" in dict(sent)  # written out: vLLM's reload would keep the old one otherwise
    assert torch.equal(dict(sent)["lm_head.weight"], dict(sent)["model.embed_tokens.weight"])
    assert list(source) == sent  # a fresh pass each time


def test_the_llm_client_wraps_what_vllms_transfer_engines_send_as_llm_takes_it() -> None:
    from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient

    from training.sampling import LLMWeightClient

    calls: list[tuple[str, object]] = []

    class Recorder:  # records the calls an in-process vllm.LLM would get
        def __getattr__(self, name: str):
            return lambda *args: calls.append((name, args))

    client = LLMWeightClient(Recorder())
    client.init_weight_transfer_engine({"packed": False})
    client.start_weight_update()
    client.update_weights([{"names": ["a"]}, {"names": ["b"]}])
    client.finish_weight_update("v2")

    assert isinstance(client, VLLMWeightSyncClient)
    assert calls == [
        ("init_weight_transfer_engine", ({"init_info": {"packed": False}},)),
        ("start_weight_update", ()),
        ("update_weights", ({"update_info": [{"names": ["a"]}, {"names": ["b"]}]},)),
        ("finish_weight_update", ("v2",)),
    ]


@NO_CUDA
def test_a_trainer_asked_for_a_gpu_stops_before_it_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from training.config import TrainerConfig
    from training.trainer import run_trainer

    assert run_trainer(TrainerConfig(data_dir=tmp_path / "data", device="cuda", once=True)) == 2
    assert "no CUDA GPU" in caplog.text
    assert not (tmp_path / "data").exists()  # nothing was created


@pytest.mark.parametrize(("setting", "native"), [("0", False), ("1", True)])
def test_the_environment_can_say_whether_the_cpu_has_native_bf16(setting: str, native: bool, bf16_setting) -> None:
    from heed.hardware import engine_dtype

    bf16_setting(setting)
    assert native_bf16() is native
    assert runtime.use_bf16(None, torch.device("cpu")) is native
    if not torch.cuda.is_available():
        assert engine_dtype("auto") == ("auto" if native else "float32")
    bf16_setting("yes")
    with pytest.raises(ValueError, match="HEED_NATIVE_BF16 must be 0 or 1"):
        native_bf16()
