"""The launcher leaves nothing running: leaving its `with` block, or its launching process being
killed with SIGKILL, ends the launched command and everything that command started. A throwaway
Python child that starts a grandchild stands in for `heed serve` and its engine processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from heed.launcher import LaunchError, ProcessGroup

# Starts a grandchild in its own process group (as vLLM starts engine processes), says both pids.
CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"pids {os.getpid()} {grandchild.pid}", flush=True)
    time.sleep(600)
    """
)

# A launcher that starts CHILD through heed.launcher and never stops it itself.
LAUNCHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from heed.launcher import ProcessGroup
    ProcessGroup([sys.executable, "-c", sys.argv[1]], Path(sys.argv[2]), stop_timeout_s=2)
    print("launched", flush=True)
    time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def launched_pids(log_path: Path, timeout_s: float = 30) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"pids (\d+) (\d+)", log_path.read_text() if log_path.exists() else "")
        if found:
            return int(found[1]), int(found[2])
        time.sleep(0.1)
    raise AssertionError(f"the child did not start in {timeout_s}s: {log_path.read_text()}")


def gone_within(pids: tuple[int, ...], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_leaving_the_with_block_ends_the_child_and_its_children(tmp_path: Path) -> None:
    with ProcessGroup([sys.executable, "-c", CHILD], tmp_path / "child.log", stop_timeout_s=5) as group:
        child, grandchild = launched_pids(tmp_path / "child.log")
        assert group.pid == child and alive(grandchild)

    assert group.process.returncode == -signal.SIGTERM
    assert gone_within((child, grandchild), 5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_launcher_killed_with_sigkill_leaves_nothing_it_launched_running(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(log_path)], start_new_session=True)
    pids: tuple[int, ...] = ()
    try:
        pids = launched_pids(log_path)
        assert all(alive(pid) for pid in pids)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)

        assert gone_within(pids, 10), f"still running: {[pid for pid in pids if alive(pid)]}"
    finally:  # whatever the outcome, the test itself leaves nothing behind
        launcher.kill()
        launcher.wait(timeout=10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_command_that_exits_fails_the_wait_at_once_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('no engine here'); raise SystemExit(3)"]
    with ProcessGroup(command, tmp_path / "exits.log") as group, pytest.raises(LaunchError, match="no engine here"):
        group.wait_for("http://127.0.0.1:9/ready", timeout_s=60)
    assert group.process.returncode == 3
