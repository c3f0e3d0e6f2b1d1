"""`heed train`: stages run from flags (reading the files they name), resume from their checkpoint
to the same weights as an uninterrupted run, and plot their metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heed.cli import build_parser
from training import runtime
from training.data import BadRecordsError, Comparison, Demonstration, write_jsonl
from training.metrics import read_metrics

pytestmark = pytest.mark.slow  # trains SFT twice (about 10 s)


def heed(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args.run(args)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_sft_resumed_from_its_checkpoint_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demos = [Demonstration(f"Question {i}?", f"Answer number {i}.") for i in range(12)]
    write_jsonl(tmp_path / "demos.jsonl", demos)
    common = [
        "train",
        "sft",
        "--model",
        str(tiny_model),
        "--train",
        str(tmp_path / "demos.jsonl"),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--no-progress",
    ]

    assert heed(*common, "--out", str(tmp_path / "whole"), "--max-steps", "6") == 0
    save = runtime.save_checkpoint

    def crash_after_step_4(run_dir, step, *args, **kwargs):
        save(run_dir, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt  # the process dies right after its step-4 checkpoint

    monkeypatch.setattr(runtime, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        heed(*common, "--out", str(tmp_path / "split"), "--max-steps", "6")
    monkeypatch.setattr(runtime, "save_checkpoint", save)
    assert heed(*common, "--out", str(tmp_path / "split"), "--max-steps", "6", "--resume") == 0

    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    whole, split = weights(tmp_path / "whole" / "model"), weights(tmp_path / "split" / "model")
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], msg=name)

    assert heed("train", "plot", str(tmp_path / "whole")) == 0
    assert (tmp_path / "whole" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_the_rm_command_reads_its_files_and_refuses_bad_records_when_strict(tmp_path: Path, tiny_model: Path) -> None:
    comparisons = [Comparison(f"Describe day {i}.", ("A sunny day.", "Rain.")) for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", comparisons)
    write_jsonl(tmp_path / "refs.jsonl", [Demonstration("Describe a day.", "A calm day.")])
    common = ["train", "rm", "--model", str(tiny_model), "--train", str(tmp_path / "train.jsonl"), "--no-progress"]

    assert heed(*common, "--valid", str(tmp_path / "train.jsonl"), "--reference", str(tmp_path / "refs.jsonl"),
                "--max-steps", "1", "--batch-size", "2", "--out", str(tmp_path / "rm")) == 0  # fmt: skip

    assert (tmp_path / "rm" / "model" / "reward_head.pt").exists()
    assert "valid_accuracy" in read_metrics(tmp_path / "rm" / "metrics.jsonl")[-1]
    with open(tmp_path / "train.jsonl", "a") as fh:
        fh.write('{"prompt": "Only one answer.", "responses": ["Yes."]}\n')
    with pytest.raises(BadRecordsError, match="train.jsonl:5"):
        heed(*common, "--strict", "--out", str(tmp_path / "strict"))
