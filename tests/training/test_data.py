"""The JSONL formats: every accepted form reads, bad records are named by file and line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from training.data import (
    BadRecordsError,
    Comparison,
    Demonstration,
    read_comparisons,
    read_demonstrations,
    read_prompts,
    read_texts,
)


def write(path: Path, lines: list) -> Path:
    """One JSON value per line; ``bytes`` are written as they are (to make broken lines)."""
    path.write_text("".join((x.decode() if isinstance(x, bytes) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_comparisons_accept_rankings_pairs_and_hh_dialogues(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.jsonl",
        [
            {"prompt": "Q?", "responses": ["best", "middle", "worst"]},
            {"prompt": "Q?", "responses": ["a", "b", "c"], "ranks": [0, 0, 1]},  # a and b tied
            {"messages": [{"role": "user", "content": "Q?"}], "chosen": "yes", "rejected": "no"},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
        ],
    )
    assert read_comparisons(path, strict=True) == [
        Comparison("Q?", ("best", "middle", "worst")),
        Comparison("Q?", ("a", "b", "c"), (0, 0, 1)),
        Comparison(({"role": "user", "content": "Q?"},), ("yes", "no")),
        Comparison("Human: Hi\n\nAssistant:", ("Hello!", "Go.")),
    ]


def test_demonstrations_prompts_and_text_read_their_forms(tmp_path: Path) -> None:
    demos = write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Q?", "response": "A."},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
        ],
    )
    assert read_demonstrations(demos, strict=True) == [
        Demonstration("Q?", "A."),
        Demonstration(({"role": "user", "content": "Q?"},), "A."),
    ]
    assert read_prompts(write(tmp_path / "p.jsonl", ["Q?", {"prompt": "R?"}]), strict=True) == ["Q?", "R?"]
    assert read_texts(write(tmp_path / "t.jsonl", [{"text": "Some text."}, "More."])) == ["Some text.", "More."]


def test_bad_records_are_skipped_with_file_and_line_or_refused(tmp_path: Path, caplog) -> None:
    path = write(
        tmp_path / "c.jsonl",
        [
            {"prompt": "Q?", "responses": ["a", "b"]},
            b"{not json",
            {"prompt": "Q?", "responses": ["only one"]},
            b"",
            {"responses": ["a", "b"]},
            {"prompt": "Q?", "responses": ["a", "b"], "ranks": [0, 0]},  # all tied: nothing to learn
            {"prompt": "Q?", "responses": ["a", "b", "c"], "ranks": [0, 2, 3]},
        ],
    )
    with caplog.at_level(logging.WARNING):
        assert len(read_comparisons(path)) == 1
    assert f"{path}:2:" in caplog.text and f"{path}:3:" in caplog.text and f"{path}:5:" in caplog.text
    assert f"{path}:6: 'ranks': ties every answer" in caplog.text
    with pytest.raises(BadRecordsError) as refused:
        read_comparisons(path, strict=True)
    assert [b.line for b in refused.value.bad] == [2, 3, 5, 6, 7]
