"""The data directory's one durable atomic write: a reader sees the old contents or the new,
never a mix, and a failed write leaves the old contents and no litter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from heed.datadir import (
    DataDir,
    atomic_folder,
    atomic_write_file,
    atomic_write_json,
    default_data_dir,
    exclusive_lock,
    restore_folder,
)
from tests.conftest import run_heed


def test_the_layout_is_named_in_one_place(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    assert d.events == tmp_path / "events.db"
    assert d.rollout_state == tmp_path / "rollout.json"
    assert d.registry == tmp_path / "registry"
    assert d.trainer == tmp_path / "trainer"
    assert d.engine_weights("canary") == tmp_path / "engine-weights" / "canary"
    assert not any(tmp_path.iterdir())  # naming creates nothing


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "heed"


def test_a_json_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_file(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_a_folder_is_replaced_whole(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # b.txt went with the old folder
    assert (dest / "a.txt").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_folder_write_leaves_the_old_folder(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("training failed")
    assert (dest / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_a_crash_left_aside_between_the_renames_is_put_back(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoint"
    aside = tmp_path / ".checkpoint.old"  # the old folder renamed aside, the new one not yet in
    aside.mkdir()
    (aside / "step.txt").write_text("7")

    restore_folder(dest)

    assert (dest / "step.txt").read_text() == "7" and not aside.exists()


def test_a_second_server_on_one_data_directory_stops_in_one_line_naming_the_first(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    held = exclusive_lock(data.serve_lock)  # as a running `heed serve` holds it
    with pytest.raises(BlockingIOError):
        exclusive_lock(data.serve_lock)
    result = run_heed(tmp_path / "cache", "serve", "--data-dir", str(data.root))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"heed: error: process {os.getpid()} already serves {data.root}; stop it or give another --data-dir"
    ]
    held.close()  # released: the next holder gets it
    exclusive_lock(data.serve_lock).close()
