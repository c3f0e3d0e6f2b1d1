"""The warm canary slot takes only what serving leaves: its engine starts at the lowest CPU
priority (nice 19) while the stable engine keeps the server's, and gets the normal priority back
once it is up, so that a canary put into it later serves at the same priority as stable."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from serving.engine import BACKGROUND_NICE, can_restore_priority
from tests.conftest import ARTIFACTS, start_server

pytestmark = pytest.mark.slow  # starts its own `heed serve`


def threads_nice(pid: int) -> set[int]:
    nice = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            nice.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
        except ProcessLookupError:
            continue  # a thread that ended
    return nice


def engine_nice(server_pid: int) -> dict[int, set[int]]:
    """The nice values of each engine process's threads (EngineCore and its workers)."""
    seen: dict[int, set[int]] = {}
    for process in psutil.Process(server_pid).children(recursive=True):
        try:
            if "VLLM" not in process.name() and "EngineCore" not in process.name():
                continue
            seen[process.pid] = threads_nice(process.pid)
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            continue
    return seen


@pytest.mark.skipif(not can_restore_priority(0), reason="this process may not raise a priority back (CAP_SYS_NICE)")
def test_the_warm_canary_slot_starts_at_the_lowest_priority_and_is_back_to_normal_once_up(tiny_model, tmp_path) -> None:
    server = start_server(
        tiny_model, tmp_path / "data", ARTIFACTS / "server-warm-slot.log", None, "--canary-slot", "warm"
    )
    try:
        stable = set(engine_nice(server.process.pid))  # ready: the stable engine's processes
        assert stable
        while_warming: dict[int, set[int]] = {}
        server_threads: set[int] = set()  # the server's own: none lowered (one holding the GIL would stall it)
        deadline = time.monotonic() + 120
        while "the canary slot is warm" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            for pid, nice in engine_nice(server.process.pid).items():
                while_warming.setdefault(pid, set()).update(nice)
            server_threads |= threads_nice(server.process.pid)
            time.sleep(0.2)
        after = engine_nice(server.process.pid)

        canary = set(while_warming) - stable
        assert canary, while_warming  # its EngineCore and worker were seen starting
        assert all(while_warming[pid] == {0} for pid in stable)  # serving kept its priority
        assert server_threads == {0}
        assert all(BACKGROUND_NICE in while_warming[pid] for pid in canary), while_warming
        assert set(after) >= stable | (canary & set(after)) and canary & set(after)
        assert all(nice == {0} for nice in after.values()), after  # every thread, both engines
        assert "processes back to the normal CPU priority" in server.log_text()
    finally:
        server.stop()
