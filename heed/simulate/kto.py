"""KTO against PPO-ptx at equal feedback (`heed simulate --compare-kto`): after the experiment,
KTO trains the start policy on the same feedback the trainer had when it trained the judged
version (the training callers' thumbs; ratings of 5-7 as desirable and 1-3 as undesirable; the
corrections' texts as desirable), and the held-out labelers judge its answers against the start
policy's and, head to head, against the PPO-ptx policy's.

The start and PPO-ptx answers are the experiment's (sampled by the server's vLLM engine); KTO's
are sampled with ``transformers.generate`` at the same temperature and length (the same
distribution: softmax at that temperature, no top-k or top-p).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from heed.datadir import DataDir
from heed.eventlog import open_store
from heed.registry import PolicyRegistry
from heed.simulate.instructions import Task
from heed.simulate.labelers import ExtraCheck, Labeler
from heed.trainer_files import TrainerFiles, TrainerState

log = logging.getLogger(__name__)


def kto_examples(data: Any) -> list[Any]:
    """The KTO examples of one round's training data (training.builders.EventLogData): every
    thumb; every rating of 5-7 (desirable) or 1-3 (undesirable), 4 being neither; every
    correction's text (desirable)."""
    from training.data import Judged

    rated = [Judged(r.prompt, r.response, r.rating >= 5) for r in data.ratings if r.rating != 4]
    fixed = [Judged(d.prompt, d.response, True) for d in data.demonstrations]
    return [*data.judged, *rated, *fixed]


def sample(policy: Path, tasks: list[Task], *, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    """One answer per task's prompt (as a one-turn chat, as the experiment asks), decoded."""
    import torch
    from transformers import AutoTokenizer

    from training import runtime
    from training.data import prompt_ids
    from training.sampling import HFSampler

    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = runtime.load_causal_lm(policy, trainable=False)
    torch.manual_seed(seed)
    ids = [prompt_ids(tokenizer, t.prompt) for t in tasks]
    answers = HFSampler(model, pad_id, tokenizer.eos_token_id, batch_size=32).generate(ids, max_new_tokens, temperature)
    return [str(tokenizer.decode(a, skip_special_tokens=True)).strip() for a in answers]


def compare_kto(
    results: dict[str, Any],
    data_dir: Path,
    out: Path,
    eval_tasks: list[Task],
    answers: dict[str, list[str]],
    judges: list[Labeler],
    *,
    heldout_fraction: float,
    max_per_caller: int,
    max_caller_share: float = 1.0,
    lr: float,
    epochs: int,
    beta: float,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    extra: dict[str, ExtraCheck] | None = None,
) -> dict[str, Any]:
    """Train KTO on the feedback behind the judged PPO-ptx version and judge it (see the module
    docstring). ``answers``: the experiment's "start" and "final" answers to ``eval_tasks``."""
    from heed.simulate.experiment import following, win_rate
    from training.config import KTOConfig
    from training.kto import train_kto
    from training.round import build_round_data

    data = DataDir(data_dir)
    registry = PolicyRegistry(data.registry)
    final = results["final_version"]
    judged_version = final if final != results["start_version"] else None
    if judged_version is not None:
        watermark = registry.manifest(judged_version).watermark
    else:
        watermark = TrainerState.load(TrainerFiles.of(data.root).state).watermark
    store = open_store(data.events)
    try:
        round_data = build_round_data(
            store, watermark, heldout_fraction, max_per_caller, max_caller_share=max_caller_share
        )  # the trainer's view of the same feedback
    finally:
        store.close()
    examples = kto_examples(round_data.train)
    random.Random(seed).shuffle(examples)
    desirable = sum(e.desirable for e in examples)
    log.info(
        "KTO from %s on %d examples (%d desirable) up to log position %d, the feedback behind %s",
        results["start_version"], len(examples), desirable, watermark, judged_version or "the last round",
    )  # fmt: skip
    # The KTO paper's advice for unbalanced data: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
    balance = (len(examples) - desirable) / desirable if desirable else 1.0
    cfg = KTOConfig(
        model=str(registry.path(results["start_version"])),
        out=out,
        lr=lr,
        epochs=epochs,
        beta=beta,
        desirable_weight=max(balance, 1.0),
        undesirable_weight=max(1 / balance, 1.0) if balance > 0 else 1.0,
        max_length=256,
        seed=seed,
        progress=False,
    )
    trained = train_kto(cfg, examples)
    kto_answers = sample(trained.model, eval_tasks, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    last = trained.steps[-1] if trained.steps else None
    return {
        "examples": len(examples),
        "desirable": desirable,
        "thumbs": len(round_data.train.judged),
        "watermark": watermark,
        "against": judged_version,
        "settings": {
            "lr": lr,
            "epochs": epochs,
            "beta": beta,
            "desirable_weight": cfg.desirable_weight,
            "undesirable_weight": cfg.undesirable_weight,
        },
        "last_step": asdict(last) if last else None,
        "against_start": win_rate(eval_tasks, answers["start"], kto_answers, judges, seed + 31, extra),
        "ppo_against_kto": win_rate(eval_tasks, kto_answers, answers["final"], judges, seed + 32, extra),
        "following": following(eval_tasks, kto_answers),
    }
