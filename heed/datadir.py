"""The data directory: the one place that names its files and folders, and the one durable atomic
write every writer of them uses. Both halves import it from here; neither spells a path by hand.

    DATA_DIR/
      events.db            the event log (heed.eventlog; SQLite, WAL), unless --event-log names a database
      rollout.json         rollout state: stable, canary, share, decisions (heed.rollout); in the
                           database instead when the event log is PostgreSQL
      registry/            published policy versions (heed.registry), unless --registry names a shared folder
      trainer/             the trainer's files (heed.trainer_files): state.json, rounds/, rm/, work/, lock
      serve.lock           held by the one `heed serve` of this directory
      engine-weights/NAME/ the swap-ready weights of engine slot NAME (serving.engine)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The event log's setting, the same for `heed serve` and `heed trainer` (heed.eventlog.log_location).
EVENT_LOG_DEFAULT = ""
EVENT_LOG_HELP = (
    "the event log: a SQLite file (PATH or sqlite:///PATH) or a PostgreSQL URL (postgresql://USER@HOST/DB,"
    " one log several replicas and a trainer share); empty: $HEED_EVENT_LOG, else DATA_DIR/events.db"
)

# The registry's setting, the same for `heed serve`, `heed trainer` and `heed registry` (registry_location).
REGISTRY_DEFAULT = ""
REGISTRY_HELP = (
    "the policy registry's folder; several replicas and a trainer on its own node share one on storage every"
    " node mounts (docs/serving.md says what it needs); empty: $HEED_REGISTRY, else DATA_DIR/registry"
)


def registry_location(configured: str | Path, data_dir: Path) -> Path:
    """Where the policy registry is: ``configured`` (a --registry setting), else $HEED_REGISTRY,
    else the data directory's ``registry/``."""
    return Path(configured or os.environ.get("HEED_REGISTRY", "") or DataDir(data_dir).registry)


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/heed``, else ``~/.local/share/heed``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "heed"


@dataclass(frozen=True)
class DataDir:
    """The layout of one data directory (nothing is created by naming it)."""

    root: Path

    @property
    def events(self) -> Path:
        return self.root / "events.db"

    @property
    def rollout_state(self) -> Path:
        return self.root / "rollout.json"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def trainer(self) -> Path:
        return self.root / "trainer"

    def engine_weights(self, slot: str) -> Path:
        return self.root / "engine-weights" / slot

    @property
    def serve_lock(self) -> Path:
        return self.root / "serve.lock"


def exclusive_lock(path: Path) -> Any:
    """One process per role and data directory: an exclusive lock held while the returned file is
    open (the kernel releases it when the process dies, even on SIGKILL); BlockingIOError if taken.
    The file holds the holder's pid, for the message a second process gives."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 (held open for the holder's lifetime)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def lock_holder(path: Path) -> str:
    """The pid written in a lock file, or "another process"."""
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


# ---- the durable atomic write ----------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) survive a power cut."""
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write_file(path: Path, write: Callable[[Path], object]) -> None:
    """Replace the file ``path`` by what ``write(tmp)`` writes to a file beside it, so a reader (or
    a crash) sees the old file or the new one, never half of one: write aside, fsync the file,
    rename over, fsync the folder. For writers that take a path (safetensors' ``save_file``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``atomic_write_file`` of ``data``."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, data: Any) -> None:
    """``atomic_write_file`` of ``data`` as indented JSON."""
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        fsync_dir(Path(folder))


def restore_folder(dest: Path) -> None:
    """Put back the old ``dest`` that a crash between ``atomic_folder``'s two renames left aside
    (``.NAME.old``, with no ``dest``); a reader of ``dest`` calls this before reading it."""
    old = dest.with_name(f".{dest.name}.old")
    if old.is_dir() and not dest.exists():
        os.replace(old, dest)
        fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``dest`` to fill; on success it replaces ``dest`` whole.

    Every file is fsync'ed before it goes in. A new ``dest`` appears by one rename (atomic). An
    existing ``dest`` is renamed aside (``.NAME.old``), the new one renamed in, the old removed:
    a reader sees the old folder or the new one, whole, or (only between those two renames) no
    folder; a crash there leaves the old one aside, which ``restore_folder`` (and the next
    ``atomic_folder``) puts back. On an error the half-written folder is removed and ``dest`` is
    untouched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    restore_folder(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
