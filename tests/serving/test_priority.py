"""The engine processes as the server finds them in the process tree (real processes, no engine):
a background engine start lowers only the processes started while it runs (those that ran before
keep their priority, and so does the server's own thread), and shutdown kills only its own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from serving.engine import LowerNewChildren, can_restore_priority, set_priority
from serving.slots import kill_engine_processes

TITLED = "import setproctitle, subprocess, sys, time; setproctitle.setproctitle(sys.argv[1]); {}; time.sleep(30)"
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


def test_shutdown_kills_the_engines_this_process_started_and_not_those_of_a_process_below_it() -> None:
    """The server's own EngineCore is its direct child; an EngineCore under another child (a server
    a test started, the trainer's rollout engine) belongs to that child. Killing those took the
    test session's server down (CI of d125b59)."""
    import psutil

    worker = f"subprocess.Popen([sys.executable, '-c', {TITLED.format('None')!r}, 'VLLM::Worker'])"
    own = subprocess.Popen([sys.executable, "-c", TITLED.format(worker), "VLLM::EngineCore"])
    engine_below = f"subprocess.Popen([sys.executable, '-c', {TITLED.format('None')!r}, 'VLLM::EngineCore'])"
    other_server = subprocess.Popen([sys.executable, "-c", TITLED.format(engine_below), "heed-serve"])
    try:
        wait_for(lambda: len(psutil.Process(own.pid).children()) == 1)
        wait_for(lambda: [c.name() for c in psutil.Process(other_server.pid).children()] == ["VLLM::EngineCore"])
        own_worker = psutil.Process(own.pid).children()[0]
        theirs = psutil.Process(other_server.pid).children()[0]

        assert kill_engine_processes() == 2
        own.wait(timeout=10)
        own_worker.wait(timeout=10)
        assert theirs.is_running() and theirs.status() != psutil.STATUS_ZOMBIE
        assert other_server.poll() is None
    finally:
        kill_trees(own, other_server)
