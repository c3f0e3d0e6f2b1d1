"""The trainer's torch threads follow the cores the rest of the machine leaves free."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from training.threads import FreeCores, follow_free_cores, threads_for


def free_over(seconds: float) -> float:
    cores = FreeCores()
    time.sleep(seconds)
    free = cores.sample()
    assert free is not None
    return free


@pytest.fixture
def torch_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores: one to keep busy, one to measure from")
def test_a_busy_neighbour_takes_a_core_from_what_is_free() -> None:
    quiet = free_over(1.5)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        busy = free_over(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    # What this process does itself is not the others': a second of our own work leaves it free.
    cores = FreeCores()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        pass
    ours = cores.sample()
    assert ours is not None
    assert quiet - busy > 0.6, (quiet, busy)
    assert ours > busy + 0.6, (ours, busy)


def test_a_thread_per_core_that_is_free_enough_at_least_one() -> None:
    assert threads_for(1.95, most=2) == 2
    assert threads_for(1.8, most=2) == 2
    assert threads_for(1.6, most=2) == 1  # the second core is 60% the others'
    assert threads_for(0.1, most=2) == 1
    assert threads_for(7.9, most=4) == 4


class Free(FreeCores):
    """Free cores as the test says (the measuring is the test above's subject)."""

    def __init__(self, free: float) -> None:
        self.cpus, self.free = [0, 1], free

    def sample(self) -> float:
        return self.free


def test_every_forward_sets_the_threads_from_the_free_cores_until_removed(torch_threads: int) -> None:
    cores, seen = Free(0.3), []
    torch.set_num_threads(2)
    unfollow = follow_free_cores(every_s=0, on_change=seen.append, cores=cores)
    layer = torch.nn.Linear(4, 4)
    try:
        layer(torch.ones(1, 4))
        assert torch.get_num_threads() == 1
        cores.free = 2.0
        layer(torch.ones(1, 4))
        assert torch.get_num_threads() == 2
        assert seen == [1, 2]
    finally:
        unfollow()
    cores.free = 0.3
    layer(torch.ones(1, 4))
    assert torch.get_num_threads() == 2 and seen == [1, 2]
