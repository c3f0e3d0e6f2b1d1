"""The reward model: the K-way loss is the mean of the pairwise losses, and it learns a
synthetic preference well enough to rank held-out answers."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.config import RMConfig
from training.data import Comparison, Demonstration, Judged, Rated, pad
from training.reward import (
    RewardModel,
    encode_answers,
    keep_layers,
    kway_loss,
    load_reward_model,
    pairwise_accuracy,
    train_reward_model,
)

pytestmark = pytest.mark.slow  # trains reward models (about 40 s)

GOOD = ["sunny", "kind", "bright", "happy", "warm", "calm", "gentle", "clear"]
BAD = ["gloomy", "cruel", "dark", "sad", "cold", "angry", "harsh", "murky"]


def synthetic_comparisons(n: int, seed: int, k: int = 4, length: int = 6) -> list[Comparison]:
    """Answers of ``length`` words; the more words from GOOD, the better the answer."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        goods = sorted(rng.sample(range(length + 1), k), reverse=True)
        answers = []
        for g in goods:
            words = rng.choices(GOOD, k=g) + rng.choices(BAD, k=length - g)
            rng.shuffle(words)
            answers.append(" ".join(words))
        items.append(Comparison(f"Describe day {rng.randint(0, 999)}.", tuple(answers)))
    return items


def test_kway_loss_equals_the_mean_of_the_explicit_pairwise_losses(tiny_model: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(tiny_model)
    comparisons = synthetic_comparisons(3, seed=1, k=4)[:2] + synthetic_comparisons(1, seed=2, k=3)
    groups = [encode_answers(tokenizer, c.prompt, c.responses, 128) for c in comparisons]

    ids, mask = pad([s for g in groups for s in g], tokenizer.pad_token_id)
    kway = kway_loss(model.score(ids, mask), [len(g) for g in groups])
    kway.backward()
    ranked = [p for name, p in model.named_parameters() if not name.startswith("feedback.")]  # the ranking's
    kway_grads = [p.grad.clone() for p in ranked]
    model.zero_grad()

    per_prompt = []
    for g in groups:  # C(K,2) separate forward passes of each pair
        pair_losses = []
        for i, j in itertools.combinations(range(len(g)), 2):
            pair_ids, pair_mask = pad([g[i], g[j]], tokenizer.pad_token_id)
            r = model.score(pair_ids, pair_mask)
            pair_losses.append(-torch.nn.functional.logsigmoid(r[0] - r[1]))
        per_prompt.append(torch.stack(pair_losses).mean())
    explicit = torch.stack(per_prompt).mean()
    explicit.backward()

    torch.testing.assert_close(kway, explicit, rtol=1e-5, atol=1e-6)
    for a, p in zip(kway_grads, ranked, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_tied_answers_make_no_pair_in_the_loss_or_the_accuracy() -> None:
    rewards = torch.tensor([2.0, 1.0, 3.0, 0.0, 5.0, -1.0], requires_grad=True)
    ranks = [(0, 1, 1, 2), 2]  # prompt 1: answers 2 and 3 tied; prompt 2: K = 2, no tie
    strict_pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # all i < j but the tied (1, 2)
    first = torch.stack([-torch.nn.functional.logsigmoid(rewards[i] - rewards[j]) for i, j in strict_pairs]).mean()
    second = -torch.nn.functional.logsigmoid(rewards[4] - rewards[5])

    torch.testing.assert_close(kway_loss(rewards, ranks), (first + second) / 2)
    # Prompt 1 ordered right: (0,1) yes, (0,2) no, (0,3) yes, (1,3) yes, (2,3) yes; prompt 2 yes.
    assert pairwise_accuracy(rewards, ranks) == (5, 6)
    assert pairwise_accuracy(rewards, [4, 2]) == (5, 7)  # untied, the wrong (1, 2) counts too


def test_reward_model_learns_a_synthetic_preference(tmp_path: Path, tiny_model: Path) -> None:
    refs = [Demonstration(c.prompt, c.responses[0]) for c in synthetic_comparisons(8, seed=5)]
    cfg = RMConfig(
        model=str(tiny_model),
        out=tmp_path / "rm",
        epochs=3,
        batch_size=8,
        lr=1e-3,
        eval_every=1000,
        progress=False,
        # fp32 throughout, so the check below is about the offset, not bf16 rounding: a bf16
        # forward rounds each score to 8 bits (steps of 0.016 near 3), and on an AMX host the
        # demonstrations' mean missed 0 by 1.4% of the scores' size from that alone.
        bf16=False,
    )
    result = train_reward_model(
        cfg, synthetic_comparisons(96, seed=3), valid=synthetic_comparisons(24, seed=4), reference=refs
    )

    assert result.heldout is not None and result.heldout.accuracy >= 0.9
    folder = result.model
    # The saved folder loads, and the demonstrations average 0 after the bias.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = load_reward_model(folder)
    seqs = [encode_answers(tokenizer, d.prompt, (d.response,), 512)[0] for d in refs]
    ids, mask = pad(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model.score(ids, mask).float()
    assert abs(float(scores.mean())) < 1e-2 * max(1.0, float(scores.abs().mean()))


def test_a_warm_start_continues_from_a_saved_reward_model(tmp_path: Path, tiny_model: Path, tokenizer) -> None:
    """With ``init`` the head and body start from the given reward model, not a new head."""
    train = synthetic_comparisons(8, seed=6)
    torch.manual_seed(1)
    previous = RewardModel.from_causal_lm(tiny_model)
    torch.nn.init.normal_(previous.head.weight, std=1.0)
    previous.save_pretrained(tmp_path / "previous")
    tokenizer.save_pretrained(tmp_path / "previous")
    cfg = RMConfig(model=str(tiny_model), batch_size=4, lr=0.0, progress=False)

    warm = train_reward_model(replace(cfg, init=tmp_path / "previous", out=tmp_path / "w"), train)
    cold = train_reward_model(replace(cfg, out=tmp_path / "c"), train)
    warm_head, cold_head = (load_reward_model(r.model).head for r in (warm, cold))

    torch.testing.assert_close(warm_head.weight, previous.head.weight)  # lr 0: nothing moved
    assert not torch.allclose(cold_head.weight, previous.head.weight)


def test_a_reward_model_on_the_bodys_first_layers_learns_saves_and_loads_at_that_depth(
    tmp_path: Path, tiny_model: Path, tokenizer
) -> None:
    """``layers``: the new reward model keeps the policy body's first N layers; it learns the
    preference, and the saved folder loads (as PPO's value model does) at that depth, with the
    same scores."""
    whole = RewardModel.from_causal_lm(tiny_model).backbone.config.num_hidden_layers
    assert whole >= 2
    cfg = RMConfig(model=str(tiny_model), out=tmp_path / "rm", batch_size=4, lr=1e-3, bf16=False, progress=False)

    result = train_reward_model(
        replace(cfg, layers=1), synthetic_comparisons(96, seed=3), valid=synthetic_comparisons(24, seed=4)
    )

    assert result.heldout is not None and result.heldout.accuracy is not None and result.heldout.accuracy >= 0.8
    loaded = load_reward_model(result.model, trainable=True)
    assert loaded.backbone.config.num_hidden_layers == 1 and len(loaded.backbone.layers) == 1
    seqs = [encode_answers(tokenizer, c.prompt, c.responses, 128)[0] for c in synthetic_comparisons(4, seed=5)]
    ids, mask = pad(seqs, tokenizer.pad_token_id)
    again = load_reward_model(result.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(ids, mask), again.score(ids, mask))
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in RewardModel.from_causal_lm(tiny_model).parameters()
    )
    with pytest.raises(ValueError, match="no list of layers"):
        keep_layers(torch.nn.Linear(2, 2), 1)


def synthetic_judged(n: int, seed: int, length: int = 6) -> tuple[list[Judged], list[Rated]]:
    """One answer per prompt (every prompt unique, as an app's users send them), its thumb up when
    most of its words are GOOD, and its 1-7 rating 1 + the number of GOOD words."""
    rng = random.Random(seed)
    thumbs, ratings = [], []
    for i in range(n):
        g = rng.randint(0, length)
        words = rng.choices(GOOD, k=g) + rng.choices(BAD, k=length - g)
        rng.shuffle(words)
        prompt = f"Describe day {seed}-{i}."
        thumbs.append(Judged(prompt, " ".join(words), g > length / 2))
        ratings.append(Rated(prompt, " ".join(words), 1 + g))
    return thumbs, ratings


def test_unpaired_thumbs_and_ratings_alone_teach_the_reward_model(tmp_path: Path, tiny_model: Path) -> None:
    """No two answers share a prompt, so no comparison exists: the pointwise thumbs loss and the
    ordinal ratings loss alone teach the preference, measured per kind on held-out examples."""
    thumbs, _ = synthetic_judged(96, seed=7)
    _, ratings = synthetic_judged(96, seed=8)
    valid_thumbs, _ = synthetic_judged(48, seed=9)
    _, valid_ratings = synthetic_judged(48, seed=10)
    cfg = RMConfig(model=str(tiny_model), out=tmp_path / "rm", epochs=3, batch_size=8, lr=1e-3, progress=False)

    result = train_reward_model(cfg, [*thumbs, *ratings], valid=[*valid_thumbs, *valid_ratings])

    heldout = result.heldout
    assert heldout is not None and heldout.thumbs == 48 and heldout.ratings == 48 and heldout.comparisons == 0
    assert heldout.accuracy is None  # no comparisons to be accurate on
    assert heldout.thumbs_auc is not None and heldout.thumbs_auc >= 0.85
    assert heldout.ratings_spearman is not None and heldout.ratings_spearman >= 0.7
    assert heldout.thumbs_ece is not None and heldout.thumbs_ece <= 0.25
    # The thumbs' offset and the ratings' cut points are saved with the head and load back.
    trained = load_reward_model(result.model)
    assert float(trained.feedback.thumb_bias) != 0.0
    assert float(trained.feedback.thumb_scale) != 1.0  # P(up)'s slope, fitted after training
    assert torch.all(trained.feedback.cuts()[1:] > trained.feedback.cuts()[:-1])


def test_fsdp_sharded_reward_model_trains_as_ddp_does(tmp_path: Path, tiny_model: Path) -> None:
    """FSDP2 on two CPU processes (gloo) for the reward model: its body sharded, the feedback
    head's scalars kept whole and averaged by hand, clipping over both; the same losses and the
    same saved reward model (head, feedback head, offset) as DDP's on the same data and seed."""
    import json
    import os
    import subprocess
    import sys

    rng = random.Random(0)
    words = ["good", "bad", "fine", "poor", "kind", "rude"]
    (tmp_path / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {"prompt": f"Say something {i}.", "responses": [" ".join(rng.choices(words, k=4)) for _ in range(3)]}
            )
            + "\n"
            for i in range(16)
        )
    )
    (tmp_path / "judged.jsonl").write_text(
        "".join(
            json.dumps(
                {"prompt": f"Answer {i}.", "response": " ".join(rng.choices(words, k=3)), "desirable": i % 2 == 0}
            )
            + "\n"
            for i in range(16)
        )
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    runs = {}
    for port, sharding in ((29531, "ddp"), (29532, "fsdp")):
        out = tmp_path / sharding
        command = [
            str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "heed", "train", "rm",
            "--model", str(tiny_model), "--train", str(tmp_path / "train.jsonl"),
            "--judged", str(tmp_path / "judged.jsonl"),
            "--valid-fraction", "0.25", "--out", str(out), "--batch-size", "2", "--max-steps", "4", "--lr", "1e-4",
            "--grad-accum", "2", "--sharding", sharding, "--no-progress", "--seed", "0",
            # fp32: what is compared is the sharding. Under bf16 autocast the two differ by the
            # matmuls' rounding, which depends on the host: 4.2e-4 in the losses on an Intel Xeon
            # with AMX (amx_bf16), under 1e-4 on the AMD EPYC hosts before it.
            "--no-bf16",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[sharding] = out

    losses = {
        s: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for s, out in runs.items()
    }
    assert (
        len(losses["fsdp"]) == 4 and max(abs(a - b) for a, b in zip(losses["ddp"], losses["fsdp"], strict=True)) < 1e-4
    )
    ddp, fsdp = (RewardModel.from_pretrained(runs[s] / "model") for s in ("ddp", "fsdp"))
    for (name, a), (_, b) in zip(ddp.state_dict().items(), fsdp.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=2e-4), name
    fresh = RewardModel.from_causal_lm(tiny_model)
    assert not torch.equal(fresh.backbone.embed_tokens.weight, fsdp.backbone.embed_tokens.weight)  # it trained
