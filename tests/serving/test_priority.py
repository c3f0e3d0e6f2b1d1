"""A background engine start lowers only the processes started while it runs (real processes, no
engine): those that ran before keep their priority, and so does the server's own thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from serving.engine import LowerNewChildren, can_restore_priority, set_priority

SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"]


def nice_of(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def kill_trees(*roots: subprocess.Popen) -> None:
    """Only what this test started: the session's servers are children of pytest too."""
    import psutil

    children = []
    for root in roots:
        try:
            process = psutil.Process(root.pid)
            children += [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=10)


def wait_for(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.skipif(not can_restore_priority(0), reason="this process may not raise a priority back (CAP_SYS_NICE)")
def test_processes_started_while_lowering_get_the_low_priority_with_their_children_and_the_rest_keep_theirs() -> None:
    old = subprocess.Popen(SLEEPER)
    started = [old]
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        lowering = LowerNewChildren(7, every_s=0.02)
        new = subprocess.Popen(SLEEPER)
        started.append(new)
        try:
            import psutil

            wait_for(lambda: len(psutil.Process(new.pid).children()) == 1 and nice_of(new.pid) == {7})
            grandchild = psutil.Process(new.pid).children()[0].pid
            wait_for(lambda: nice_of(grandchild) == {7})
            assert nice_of(old.pid) == {0}
            assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
        finally:
            lowering.stop()
        assert set_priority([new.pid, grandchild], 0) == 2  # and back: every thread
        assert nice_of(new.pid) == {0} and nice_of(grandchild) == {0}
        later = subprocess.Popen(SLEEPER)  # after stop(): left alone
        started.append(later)
        time.sleep(0.2)
        assert nice_of(later.pid) == {0}
    finally:
        kill_trees(*started)
