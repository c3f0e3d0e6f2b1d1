"""Every training setting, declared once: the fields the stages share (``StageConfig``), each
stage's config (``SFTConfig``, ``RMConfig``, ``PPOConfig``), what ``heed train STAGE`` adds to it
(the input files: ``SFTFiles``, ``RMFiles``, ``PPOFiles``), and the trainer's config, which holds
its reward-model and PPO configs whole (``TrainerConfig.rm``, ``TrainerConfig.ppo``).

    StageConfig                     out, lr, grad_accum, save_every, bf16, seed, resume, progress
      SupervisedConfig              + model, epochs, batch_size, max_length, validation (SFT, RM)
        SFTConfig, RMConfig         + their own; SFTFiles, RMFiles add the files the CLI reads
      PPOConfig                     + policy, reward model, rollouts, losses; PPOFiles
    TrainerConfig                   its own settings, rm: RMConfig, ppo: PPOConfig

Flags, ``HEED_<SECTION>_<FIELD>`` variables and TOML keys are generated from the fields
(heed.config). The trainer's stage settings keep their flat flags (``--rm-lr``,
``--ppo-iterations``, ``--kl-coef``...): ``TRAINER_FLAGS`` maps each onto its stage field, and
``load_trainer_config`` builds the nested config from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from heed import config
from heed.config import option
from heed.datadir import EVENT_LOG_DEFAULT, EVENT_LOG_HELP, REGISTRY_DEFAULT, REGISTRY_HELP, default_data_dir
from training.builders import DEFAULT_SCORE_KEYS


class SamplingEngine(StrEnum):
    """What samples PPO's rollouts: ``transformers.generate`` on the policy, or an own vLLM engine."""

    HF = "hf"
    VLLM = "vllm"


# ---- the stages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """What every stage shares: where it writes, its optimizer's step, its numerics and seed,
    checkpoints and resuming."""

    out: Path = option(Path("runs"), "run folder: metrics.jsonl, checkpoint/, model/")
    lr: float = option(1e-5, "learning rate (AdamW)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    save_every: int = option(100, "checkpoint every N steps (and at the end)")
    bf16: bool | None = option(None, "bf16 autocast (default: where the CPU has native bf16)")
    seed: int = option(0, "seed of the data order, sampling and initialisation")
    resume: bool = option(False, "continue from OUT/checkpoint if there is one")
    progress: bool = option(True, "show a progress bar")
    device: str = option(
        "auto",
        "auto (this process's CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N; under torchrun each"
        " process takes the GPU of its LOCAL_RANK and the job joins over NCCL",
    )


def _help(cls: Any, name: str) -> str:
    """The help string of the config class ``cls``'s field ``name``."""
    return str(cls.__dataclass_fields__[name].metadata["help"])


def _default(base: type, name: str, value: Any) -> Any:
    """Field ``name`` of the config class ``base`` with a stage's own default (same help)."""
    return option(value, _help(base, name))


@dataclass(frozen=True)
class SupervisedConfig(StageConfig):
    """The stages that pass over a labelled data set in epochs: SFT and the reward model."""

    model: str = option("default", "the model to start from: a HF folder or 'default' (SmolLM2-135M)")
    valid_fraction: float = option(0.1, "share of the training data held out when no validation set is given")
    epochs: int = option(1, "passes over the training data")
    max_steps: int = option(0, "stop after this many optimizer steps (0: --epochs decides)")
    batch_size: int = option(
        4, "examples per micro-batch (the reward model's: comparisons with all K answers, thumbs, ratings)"
    )
    warmup_steps: int = option(5, "linear warm-up steps")
    max_length: int = option(512, "tokens per example (prompt + answer); longer ones are cut")
    eval_every: int = option(50, "validation every N steps (and at the end)")


@dataclass(frozen=True)
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning (training/sft.py)."""

    out: Path = _default(StageConfig, "out", Path("runs/sft"))
    epochs: int = _default(SupervisedConfig, "epochs", 2)
    batch_size: int = _default(SupervisedConfig, "batch_size", 8)
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr * this")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lora_r: int = option(0, "LoRA rank for the policy (0: full fine-tuning)")
    sharding: str = option(
        "ddp",
        "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: parameters, gradients and"
        " optimizer state split across the processes, for a model that does not fit one device; full fine-tuning)",
    )


@dataclass(frozen=True)
class RMConfig(SupervisedConfig):
    """The reward model (training/reward.py): one epoch by default, as in the paper (more overfits)."""

    out: Path = _default(StageConfig, "out", Path("runs/rm"))
    init: Path | None = option(
        None, "a reward-model folder to continue training (warm start) instead of a new head on --model's body"
    )
    layers: int = option(
        0,
        "transformer layers of --model's body the new reward model keeps, the first N (0: all). Fewer cost less in"
        " every use: its training, PPO's scoring and PPO's value model, which starts from it. A warm start (--init)"
        " keeps the depth of the model it continues",
    )
    ranking_weight: float = option(1.0, "loss weight of a labeler's K-way ranking")
    thumb_weight: float = option(1.0, "loss weight of a thumb (pointwise) and of a pair of thumbs on one prompt")
    rating_weight: float = option(
        1.0, "loss weight of a 1-7 rating (ordinal) and of one prompt's answers rated differently"
    )
    correction_weight: float = option(1.0, "loss weight of a correction: the corrected text over the model's answer")
    feedback_lr: float = option(
        0.02, "learning rate of the thumbs' offset and the ratings' cut points (scalars on the reward's scale)"
    )
    sharding: str = option(
        "ddp",
        "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: the body's parameters, gradients"
        " and optimizer state split across the processes, for a model that does not fit one device)",
    )


@dataclass(frozen=True)
class PPOConfig(StageConfig):
    """PPO and PPO-ptx (training/ppo.py)."""

    out: Path = _default(StageConfig, "out", Path("runs/ppo"))
    lr: float = option(1e-6, "policy learning rate (AdamW)")
    save_every: int = option(5, "checkpoint every N iterations (and at the end)")
    policy: str = option("default", "the SFT policy folder to start from (also the KL reference)")
    reward_model: Path | None = option(None, "the reward model folder (required); the value model starts from it")
    iterations: int = option(20, "rollout-then-update iterations")
    episodes: int = option(16, "episodes (prompt + sampled response) per iteration")
    max_prompt_length: int = option(256, "prompt tokens kept (the last ones)")
    max_new_tokens: int = option(48, "response tokens sampled at most")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    ppo_epochs: int = option(2, "passes over each iteration's episodes")
    minibatch_size: int = option(8, "episodes per micro-batch")
    value_lr: float = option(1e-5, "value model learning rate (AdamW)")
    kl_coef: float = option(0.02, "beta: the per-token KL penalty against the reference policy")
    adaptive_kl: bool = option(False, "adapt beta towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = option(6.0, "target KL per episode (nats) for --adaptive-kl")
    kl_horizon: int = option(10000, "episodes over which the adaptive beta moves")
    stop_kl: float = option(
        0.0, "stop early once the policy's KL per episode to the reference passes this, keeping the last one within it"
    )
    empty_last: bool = option(
        True,
        "score an answer with no visible text 1 below the iteration's lowest-scoring answer with text, not as the"
        " reward model scores it: it has seen few empty answers, and a policy pushed toward short ones finds them",
    )
    gamma: float = option(1.0, "discount over response tokens")
    lam: float = option(0.95, "GAE lambda")
    clip_range: float = option(0.2, "PPO ratio clip epsilon")
    value_clip: float = option(0.2, "value prediction clip around the rollout's value")
    ptx_coef: float = option(0.0, "gamma of PPO-ptx: weight of the pretraining log-likelihood (paper: 27.8)")
    ptx_batch_size: int = option(4, "pretraining texts per update step")
    ptx_demo_share: float = option(
        0.5,
        "share of each ptx batch drawn from the demonstrations when there are any (a round's corrections, or"
        " --demonstrations): the prompt then the written answer, the log-likelihood of the answer only",
    )
    ptx_max_length: int = option(256, "tokens per pretraining text")
    max_grad_norm: float = option(1.0, "gradient clipping (policy and value)")
    rollout: SamplingEngine = option(SamplingEngine.HF, "rollout engine: 'vllm' or 'hf' (transformers.generate)")
    rollout_gpu_memory_utilization: float = option(
        0.15,
        "on a GPU, with rollout vllm: the rollout engine's share of the GPU's memory (vLLM's gpu_memory_utilization;"
        " the rest is the training step's). heed serve --with-trainer sets it to its --trainer-gpu-memory-utilization",
    )
    lora_r: int = option(0, "LoRA rank for the policy (0: full fine-tuning)")
    init_adapter: Path | None = option(
        None,
        "a LoRA adapter (peft folder) on --policy to start from: the policy trains it further at its rank, and the KL"
        " reference is --policy with it applied. Implies LoRA; the result's adapter/ folder is the new adapter",
    )
    weight_transfer: str = option(
        "auto",
        "with rollout vllm: how the trained weights reach the rollout engine each iteration: auto (vLLM's CUDA IPC"
        " when the policy is on a GPU, else a file), ipc, or disk (a file and reload_weights)",
    )

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (none: they can run). A negative
        coefficient would turn a penalty into a bonus: the KL term would push the policy away from
        its reference, the pretraining term would unlearn the text."""
        found = [
            f"--{name.replace('_', '-')} must be 0 or more; got {value:g}"
            for name, value in (("kl_coef", self.kl_coef), ("ptx_coef", self.ptx_coef), ("stop_kl", self.stop_kl))
            if not value >= 0  # NaN too
        ]
        if not 0 <= self.ptx_demo_share <= 1:
            found.append(f"--ptx-demo-share must be from 0 to 1; got {self.ptx_demo_share:g}")
        if not self.clip_range > 0:
            found.append(f"--clip-range must be above 0; got {self.clip_range:g}")
        for name in ("iterations", "episodes", "minibatch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                found.append(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        return found


# ---- what `heed train STAGE` reads: the stage's config and its input files ------------------------


@dataclass(frozen=True)
class InputFiles:
    strict: bool = option(False, "refuse (instead of skip) bad records in the input files")


@dataclass(frozen=True)
class KTOConfig(SupervisedConfig):
    """KTO (training/kto.py): the policy from unpaired desirable / undesirable answers, against
    the start policy as its reference. A baseline beside the reward model and PPO."""

    out: Path = _default(StageConfig, "out", Path("runs/kto"))
    lr: float = _default(StageConfig, "lr", 5e-6)
    batch_size: int = _default(SupervisedConfig, "batch_size", 8)
    beta: float = option(0.1, "beta: how sharply the loss saturates in the log-ratio to the reference")
    desirable_weight: float = option(1.0, "lambda_D: the weight of a desirable answer's loss")
    undesirable_weight: float = option(1.0, "lambda_U: the weight of an undesirable answer's loss")


@dataclass(frozen=True)
class SFTFiles(SFTConfig, InputFiles):
    train: Path | None = option(None, "demonstrations JSONL (required)")
    valid: Path | None = option(None, "held-out demonstrations JSONL (default: --valid-fraction of --train)")


@dataclass(frozen=True)
class KTOFiles(KTOConfig, InputFiles):
    train: Path | None = option(None, "judged answers JSONL (required): prompt, response, desirable")
    valid: Path | None = option(None, "held-out judged answers JSONL (default: --valid-fraction of --train)")


@dataclass(frozen=True)
class RMFiles(RMConfig, InputFiles):
    train: Path | None = option(None, "comparisons JSONL: K >= 2 answers ranked best first (or --judged / --ratings)")
    valid: Path | None = option(None, "held-out comparisons JSONL (default: --valid-fraction of the training data)")
    judged: Path | None = option(None, "thumbs JSONL (prompt, response, desirable): the pointwise loss")
    ratings: Path | None = option(None, "ratings JSONL (prompt, response, rating 1-7): the ordinal loss")
    reference: Path | None = option(
        None, "demonstrations JSONL whose mean score is set to 0 (default: the best-ranked training answers)"
    )


@dataclass(frozen=True)
class PPOFiles(PPOConfig, InputFiles):
    prompts: Path | None = option(None, "prompts JSONL (required)")
    ptx_data: Path | None = option(None, "pretraining text JSONL for PPO-ptx")
    demonstrations: Path | None = option(
        None, "demonstrations JSONL (prompt, response) mixed into the ptx term (--ptx-demo-share of each batch)"
    )


# ---- the trainer ---------------------------------------------------------------------------------

# The trainer's stage settings where they differ from the stages' own: sized for a round on 2 cores,
# the reward model judged on the held-out set once, at the end, and no progress bars in a service.
TRAINER_RM = RMConfig(batch_size=2, max_length=256, eval_every=10**9, save_every=10**9, progress=False)
TRAINER_PPO = PPOConfig(iterations=8, episodes=8, minibatch_size=4, ptx_coef=1.0, max_new_tokens=32, progress=False)


@dataclass(frozen=True)
class TrainerConfig:
    data_dir: Path = option(default_data_dir(), "the data directory: events.db, registry/, rollout.json, trainer/")
    event_log: str = option(EVENT_LOG_DEFAULT, EVENT_LOG_HELP)
    registry: str = option(REGISTRY_DEFAULT, REGISTRY_HELP)
    keep_versions: int = option(
        5,
        "the trainer's own published versions to keep in the registry, newest first; older ones are pruned unless"
        " the rollout serves them or may go back to them (stable, canary, the previous stable). Imported and"
        " manually published versions always stay. 0: keep every version",
    )
    min_new_feedback: float = option(
        64.0,
        "new feedback since the last round to start one: the reward model's examples derivable from the feedback"
        " logged since (each caller's latest --max-per-caller of each kind), each comparison counting 1 and thumbs,"
        " ratings and corrections by --thumb-signal, --rating-signal and --correction-signal; no caller"
        " counts for more than --max-caller-share of it",
    )
    max_caller_share: float = option(
        0.25,
        "the most of the new feedback one caller (the end user an app names, else the API key) may carry towards"
        " --min-new-feedback: a caller with more is weighed down to that share, so fewer than 1/share callers never"
        " start a round, however much they send (as the canary's --max-caller-share for its thumbs); nor does a"
        " caller give more than that share of any kind of a round's data (training and held-out: examples, prompts);"
        " 1: no cap",
    )
    thumb_signal: float = option(0.5, "what one thumb counts towards --min-new-feedback")
    rating_signal: float = option(1.0, "what one 1-7 rating counts towards --min-new-feedback")
    correction_signal: float = option(1.0, "what one correction counts towards --min-new-feedback")
    poll_s: float = option(10.0, "seconds between looks at the event log")
    once: bool = option(False, "run at most one round, then exit (with too little data: exit 0 with a message)")
    heldout_fraction: float = option(
        0.2, "share of callers (the completion's user, else the feedback's principal) held out for evaluation"
    )
    # ---- the round's data
    rm_max_examples: int = option(
        128, "training examples of each kind (comparisons, thumbs, ratings) per round at most: a seeded sample (0: all)"
    )
    heldout_max_examples: int = option(
        64, "held-out examples of each kind (comparisons, thumbs, ratings) the reward models are judged on (0: all)"
    )
    ppo_max_examples: int = option(
        2048,
        "prompts, ptx texts and demonstrations PPO gets per round at most: a seeded sample of each (0: all). A round"
        " uses iterations x episodes prompts; the rest would only be tokenized and held",
    )
    max_per_caller: int = option(
        200, "examples of each kind one caller gives a round at most: their latest (0: no cap); no caller dominates"
    )
    score_keys: tuple[str, ...] = option(
        DEFAULT_SCORE_KEYS,
        "named scores the reward model trains on, as key=thumb or key=rating, comma-separated: a thumb from a"
        " boolean or a number (at least 0.5: up), a rating from a whole number 1-7; other keys are kept, not used",
    )
    ptx_data: Path | None = option(
        None, "pretraining text JSONL for PPO-ptx (default: the logged answers of the training callers)"
    )
    # ---- the gate
    rm_accuracy_margin: float = option(
        0.05, "the new RM's held-out accuracy may be at most this much below the previous RM's"
    )
    min_rm_accuracy: float = option(
        0.0,
        "the new RM's held-out accuracy must reach this too, whatever came before (judged on its upper bound at"
        " --rm-accuracy-z)",
    )
    rm_accuracy_z: float = option(
        1.0,
        "--min-rm-accuracy is missed only when the held-out comparisons show it: the accuracy's Wilson upper"
        " bound at this many standard errors, over the comparisons (rankings, not pairs; at least"
        " --gate-min-examples of them), is under it (on 34, 1 lets 0.62 pass against 0.65 and fails 0.55);"
        " 0: the accuracy itself",
    )
    rm_fallback: bool = option(
        True,
        "when the new RM fails its checks but the previous one passes a first RM's floors on the same held-out"
        " data (and ranks it at least as well), run PPO against the previous one instead of ending the round"
        " before PPO (the gate still applies)",
    )
    min_thumbs_auc: float = option(0.55, "the new RM's held-out thumbs AUC (up-voted above down-voted) must reach this")
    max_thumbs_ece: float = option(0.3, "the new RM's expected calibration error of P(up) on held-out thumbs: at most")
    min_ratings_spearman: float = option(0.1, "the new RM's rank correlation with held-out 1-7 ratings: at least")
    gate_min_examples: int = option(
        24, "held-out thumbs (or ratings) needed before their checks count: with fewer, they are reported, not gated"
    )
    min_win_rate: float = option(0.55, "candidate vs stable, judged by the new RM, ties half: at least this")
    eval_prompts: int = option(32, "prompts of the win-rate evaluation (one sample each; held-out callers' first)")
    max_kl: float = option(
        10.0, "bound on the mean KL per episode to the stable policy (nats) at the end of PPO; PPO stops before it"
    )
    kl_window: int = option(3, "last PPO iterations whose mean KL is held to --max-kl")
    max_entropy_ratio: float = option(
        2.0,
        "reject a candidate whose per-token entropy at PPO's last iteration is more than this many times its "
        "first's: the policy collapsed into noise (good rounds seen at 0.8-1.4)",
    )
    take_up_wait_s: float = option(
        60.0,
        "after publishing, wait up to this long for the server's controller to take the version up (canary or"
        " refusal) before the next round, which then starts from the right stable version (0: do not wait)",
    )
    # ---- adapter mode (the server's --policy-mode adapter, which it records in the rollout state)
    adapter_rank: int = option(
        8, "in adapter mode: the LoRA rank of the first adapter on a base (later rounds keep the stable adapter's)"
    )
    adapter_lr: float = option(1e-5, "in adapter mode: PPO's learning rate for the adapter (AdamW)")
    # ---- the host
    nice: int = option(10, "added to the process's nice value at start: a lower CPU priority than serving")
    threads: int = option(
        0,
        "torch threads (0: on the CPU, one per core the rest of the machine leaves free, such as serving's engines,"
        " re-checked every second; on a GPU, torch's default)",
    )
    memory_budget_gib: float = option(12.0, "skip a round whose estimated memory exceeds this")
    device: str = option(
        "auto", "where a round trains and judges: auto (the first CUDA GPU if any, else the CPU), cpu or cuda:N"
    )
    metrics_port: int = option(0, "serve the trainer's Prometheus metrics at /metrics on this port (0: none)")
    metrics_host: str = option("127.0.0.1", "address the metrics port listens on (0.0.0.0: every interface)")
    seed: int = option(0, "seed of round 1 (round N uses seed + N - 1)")
    # ---- the stages (their flags: TRAINER_FLAGS); a round replaces the model folders and the seed
    rm: RMConfig = field(default=TRAINER_RM)
    ppo: PPOConfig = field(default=TRAINER_PPO)


Stage = Literal["rm", "ppo"]
STAGE_TITLES: dict[Stage, str] = {"rm": "reward model", "ppo": "PPO"}

# The trainer's flags for its stages' settings (each also HEED_TRAINER_<FLAG> and a [trainer] key):
# flag -> (stage, field of the stage's config). The max_new_tokens, temperature and the reward
# model's max_length and batch_size serve the round's evaluation too.
TRAINER_FLAGS: dict[str, tuple[Stage, str]] = {
    "rm_lr": ("rm", "lr"),
    "rm_epochs": ("rm", "epochs"),
    "rm_batch_size": ("rm", "batch_size"),
    "rm_max_length": ("rm", "max_length"),
    "rm_layers": ("rm", "layers"),
    "rm_ranking_weight": ("rm", "ranking_weight"),
    "rm_thumb_weight": ("rm", "thumb_weight"),
    "rm_rating_weight": ("rm", "rating_weight"),
    "rm_correction_weight": ("rm", "correction_weight"),
    "rm_feedback_lr": ("rm", "feedback_lr"),
    "ppo_iterations": ("ppo", "iterations"),
    "ppo_episodes": ("ppo", "episodes"),
    "ppo_minibatch_size": ("ppo", "minibatch_size"),
    "ppo_lr": ("ppo", "lr"),
    "value_lr": ("ppo", "value_lr"),
    "kl_coef": ("ppo", "kl_coef"),
    "ptx_coef": ("ppo", "ptx_coef"),
    "ptx_demo_share": ("ppo", "ptx_demo_share"),
    "max_new_tokens": ("ppo", "max_new_tokens"),
    "rollout": ("ppo", "rollout"),
    "rollout_gpu_memory_utilization": ("ppo", "rollout_gpu_memory_utilization"),
    "weight_transfer": ("ppo", "weight_transfer"),
    "temperature": ("ppo", "temperature"),
}
_STAGE_CLASSES: dict[Stage, type] = {"rm": RMConfig, "ppo": PPOConfig}
_OWN = tuple(f.name for f in fields(TrainerConfig) if f.name not in _STAGE_CLASSES)


def _trainer_flags_class() -> type:
    """The trainer's flat settings as one dataclass for heed.config (flags, variables, TOML keys):
    its own fields, then each of TRAINER_FLAGS with its stage field's type and help and the
    trainer's default."""
    own_hints = typing.get_type_hints(TrainerConfig)
    flat: list[tuple[str, Any, Any]] = [
        (f.name, own_hints[f.name], option(f.default, f.metadata["help"]))
        for f in fields(TrainerConfig)
        if f.name in _OWN
    ]
    defaults = TrainerConfig()
    for flag, (stage, name) in TRAINER_FLAGS.items():
        cls = _STAGE_CLASSES[stage]
        default = getattr(getattr(defaults, stage), name)
        help_text = f"{STAGE_TITLES[stage]}: {_help(cls, name)}"
        flat.append((flag, typing.get_type_hints(cls)[name], option(default, help_text)))
    return dataclasses.make_dataclass("TrainerFlags", flat, frozen=True)


TrainerFlags = _trainer_flags_class()


def trainer_config(flags: Any) -> TrainerConfig:
    """The nested config from a ``TrainerFlags`` (or any object with its attributes)."""
    stages = {
        stage: replace(
            getattr(TrainerConfig(), stage),
            **{name: getattr(flags, flag) for flag, (s, name) in TRAINER_FLAGS.items() if s == stage},
        )
        for stage in _STAGE_CLASSES
    }
    return TrainerConfig(**{name: getattr(flags, name) for name in _OWN}, **stages)


def trainer_flags(cfg: TrainerConfig) -> dict[str, Any]:
    """The flat settings (flag name -> value) that give ``cfg``'s own fields and mapped stage fields."""
    own = {name: getattr(cfg, name) for name in _OWN}
    return own | {flag: getattr(getattr(cfg, stage), name) for flag, (stage, name) in TRAINER_FLAGS.items()}


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """``heed trainer``'s flags: one per flat setting."""
    config.add_arguments(parser, TrainerFlags)


def load_trainer_config(
    args: argparse.Namespace | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainerConfig:
    """The trainer's config from its defaults, the ``[trainer]`` table of ``config_file``, the
    ``HEED_TRAINER_*`` environment (``env``, else os.environ) and the parsed flags."""
    return trainer_config(config.load(TrainerFlags, "trainer", args, config_file, env))
