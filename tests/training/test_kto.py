"""KTO from unpaired thumbs: its loss against the paper's definition, its data from files and from
the event log, and the stage on a tiny model (it raises the held-out margin between desirable and
undesirable answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heed.eventlog import ChoiceRecord, CompletionRecord, FeedbackRecord, open_store
from training.builders import build_from_event_log
from training.config import KTOConfig
from training.data import Judged, read_judged, to_json, write_jsonl
from training.kto import kto_loss, reference_point, train_kto


def grad_of_loss(r: float, desirable: bool, z: float = 0.0, **weights: float) -> float:
    rewards = torch.tensor([r], requires_grad=True)
    kto_loss(rewards, torch.tensor([desirable]), torch.tensor(z), beta=0.5, **weights).backward()
    assert rewards.grad is not None
    return float(rewards.grad[0])


def test_a_desirable_answer_is_pushed_up_and_an_undesirable_one_down() -> None:
    assert grad_of_loss(0.3, desirable=True) < 0  # descent raises r
    assert grad_of_loss(0.3, desirable=False) > 0  # descent lowers r
    # Far past the reference point the value saturates: little is left to gain (prospect theory).
    assert abs(grad_of_loss(40.0, desirable=True)) < 1e-3 * abs(grad_of_loss(0.0, desirable=True))


def test_the_loss_is_measured_from_the_reference_point_and_weighted_per_kind() -> None:
    at_z = kto_loss(torch.tensor([2.0, 2.0]), torch.tensor([True, False]), torch.tensor(2.0), beta=0.1)
    assert float(at_z) == pytest.approx(0.5)  # 1 - sigmoid(0) for both kinds
    plain = kto_loss(torch.tensor([1.0]), torch.tensor([False]), torch.tensor(0.0), beta=0.1)
    weighted = kto_loss(torch.tensor([1.0]), torch.tensor([False]), torch.tensor(0.0), 0.1, undesirable_weight=3.0)
    assert float(weighted) == pytest.approx(3 * float(plain))
    assert grad_of_loss(0.3, True, desirable_weight=2.0) == pytest.approx(2 * grad_of_loss(0.3, True))


def test_the_reference_point_is_a_nonnegative_constant() -> None:
    policy = torch.tensor([-3.0, -1.0], requires_grad=True)
    z = reference_point(policy, torch.tensor([-1.0, -1.0]))
    assert float(z) == 0.0 and not z.requires_grad  # a mean log-ratio below 0 is clamped
    assert float(reference_point(torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -1.0]))) == pytest.approx(1.5)


def test_judged_answers_round_trip_through_jsonl_and_bad_ones_are_reported(tmp_path: Path) -> None:
    judged = [
        Judged("Say hi.", "Hi!", True),
        Judged((({"role": "user", "content": "Name a colour."}),), "Seven.", False),
    ]
    write_jsonl(tmp_path / "j.jsonl", judged)
    with open(tmp_path / "j.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "x", "response": "y", "desirable": "yes"}) + "\n")

    assert read_judged(tmp_path / "j.jsonl") == judged  # the bad line skipped, with a warning
    assert to_json(judged[0]) == {"prompt": "Say hi.", "response": "Hi!", "desirable": True}
    with pytest.raises(ValueError, match="desirable"):
        read_judged(tmp_path / "j.jsonl", strict=True)


def test_every_thumb_on_unique_prompts_becomes_one_judged_answer_the_latest_vote_counting(tmp_path: Path) -> None:
    store = open_store(tmp_path / "events.db")
    for i, prompt in enumerate(["Say hi.", "Say bye.", "Say thanks."]):  # no prompt twice: no pairs
        choice = ChoiceRecord(0, f"answer {i}", (5, 6), "stop")
        store.append_completion(
            CompletionRecord(
                f"c{i}", 0.0, "app", "v1", "completions", prompt, None, (1, 2 + i), {}, (choice,), 2, 2, 0.1
            )
        )
        store.append_feedback(FeedbackRecord(f"f{i}", f"c{i}", 1.0, "app", "thumb", thumb=1 if i else -1))
    store.append_feedback(FeedbackRecord("f9", "c2", 2.0, "app", "thumb", thumb=-1))  # changed their mind

    data = build_from_event_log(store)
    store.close()

    assert data.pairs == []
    assert sorted((j.response, j.desirable) for j in data.judged) == [
        ("answer 0", False),
        ("answer 1", True),
        ("answer 2", False),
    ]
    assert [j.prompt.token_ids for j in data.judged if j.response == "answer 1"] == [(1, 3)]  # as served


def test_kto_raises_the_held_out_margin_of_desirable_over_undesirable_answers(tiny_model: Path, tmp_path: Path) -> None:
    prompts = [f"Question {i}?" for i in range(12)]
    good, bad = "yes yes yes", "no no no"
    data = [Judged(p, good, True) for p in prompts] + [Judged(p, bad, False) for p in prompts]
    valid = [Judged("Another question?", good, True), Judged("Another question?", bad, False)]
    cfg = KTOConfig(model=str(tiny_model), out=tmp_path / "kto", lr=1e-3, max_steps=12, batch_size=8, beta=0.5)

    result = train_kto(cfg, data, valid)

    first, last = result.steps[0], result.steps[-1]
    assert first.valid_margin == pytest.approx(0.0, abs=0.05)  # the policy starts as its reference (bf16 there)
    assert last.valid_margin is not None and last.valid_margin > 1.0
    assert len(result.steps) == 13 and all(s.loss is not None for s in result.steps[1:])
    assert (result.model / "config.json").exists()


def test_heed_train_kto_reads_its_judged_answers_from_a_file(tiny_model: Path, tmp_path: Path) -> None:
    from heed.cli import build_parser

    write_jsonl(tmp_path / "thumbs.jsonl", [Judged("Hi?", "Hello.", True), Judged("Hi?", "Go away.", False)] * 2)
    flags = ["--train", str(tmp_path / "thumbs.jsonl"), "--model", str(tiny_model), "--out", str(tmp_path / "run")]
    args = build_parser().parse_args(["train", "kto", *flags, "--max-steps", "1", "--no-progress"])

    assert args.run(args) == 0
    assert (tmp_path / "run" / "model" / "config.json").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = build_parser().parse_args(["train", "kto", "--train", str(empty), "--model", str(tiny_model)])
    with pytest.raises(ValueError, match="empty.jsonl: no usable judged answers"):
        args.run(args)
