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
    ServedPrompt,
    read_comparisons,
    read_demonstrations,
    read_prompts,
    read_texts,
    to_json,
    write_jsonl,
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


def test_prompts_from_the_log_keep_their_served_ids_through_a_file(tmp_path: Path) -> None:
    """A served prompt is written with its token ids (and "raw" for a /v1/completions text) and
    read back equal; a plain "prompt" stays a user turn."""
    chat = ({"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Q?"})
    prompts = [
        ServedPrompt(text="Q?", token_ids=(1, 2)),
        ServedPrompt(messages=chat, token_ids=(3, 4, 5)),
        ServedPrompt(token_ids=(6,)),  # a /v1/completions prompt sent as token ids
        ServedPrompt(text="No ids, raw."),
        "Q?",
    ]
    assert [to_json(p) for p in prompts] == [
        {"prompt": "Q?", "raw": True, "prompt_token_ids": [1, 2]},
        {"messages": list(chat), "prompt_token_ids": [3, 4, 5]},
        {"prompt_token_ids": [6]},
        {"prompt": "No ids, raw.", "raw": True},
        {"prompt": "Q?"},
    ]
    write_jsonl(tmp_path / "p.jsonl", prompts)
    assert read_prompts(tmp_path / "p.jsonl", strict=True) == prompts
    records = [
        Comparison(prompts[0], ("a", "b")),
        Comparison(prompts[2], ("a", "b", "c"), (0, 0, 1)),
        Demonstration(prompts[1], "A."),
    ]
    write_jsonl(tmp_path / "c.jsonl", records[:2])
    write_jsonl(tmp_path / "d.jsonl", records[2:])
    assert read_comparisons(tmp_path / "c.jsonl", strict=True) == records[:2]
    assert read_demonstrations(tmp_path / "d.jsonl", strict=True) == records[2:]
    assert read_comparisons(
        write(tmp_path / "pair.jsonl", [{"prompt_token_ids": [6], "chosen": "yes", "rejected": "no"}]), strict=True
    ) == [Comparison(prompts[2], ("yes", "no"))]


def test_served_prompt_fields_are_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q?", "prompt_token_ids": [1, 2]},  # a user turn's ids? say raw, or use messages
            {"messages": [{"role": "user", "content": "Q?"}], "raw": True},
            {"prompt": "Q?", "raw": "yes"},
            {"prompt": "Q?", "raw": True, "prompt_token_ids": [1, -2]},
            {"prompt_token_ids": []},
        ],
    )
    with pytest.raises(BadRecordsError) as refused:
        read_prompts(path, strict=True)
    assert [b.line for b in refused.value.bad] == [1, 2, 3, 4, 5]
    assert "needs 'raw': true" in str(refused.value.bad[0])
