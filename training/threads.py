"""Torch threads for the cores the rest of the machine leaves free, re-checked as it changes.

Beside `heed serve` on a small CPU host the trainer shares the cores with vLLM, whose CPU worker
holds a core at 100% while it serves (even at two requests a second) and sleeps when idle. A
torch op split over two threads waits for the slower one at every barrier, and a trainer at nice
10 gets a sliver of a core that serving holds: on 2 cores beside a serving engine, a reward-model
step of the bundled 135M took 55 s with 2 threads against 6.0 s with 1; on a quiet machine 2.4 s
with 2 against 4.0 with 1 (docs/benchmarks.md, "Torch threads beside a serving engine"). So the
trainer computes with as many threads as there are cores the others leave free, measured from
``/proc/stat`` over the last second or so (the cores this process may run on only, less its
own use), and changes the number as serving starts and stops.

``follow_free_cores`` installs it as a global module forward pre-hook: every forward (a training
step's, each generated token's) runs on the training thread, where torch's thread count is set,
and the hook costs a clock read until the next check is due.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A thread per core the others leave free, when at least this much of it is free: a thread on a
# core the others use half of waits for them at every barrier.
FREE_ENOUGH = 0.75


class FreeCores:
    """Cores this process may use, and how many of them the rest of the machine left free
    between two ``sample`` calls (None where ``/proc`` is not readable: not Linux)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._last = self._ticks()

    def _ticks(self) -> tuple[int, int, int] | None:
        """(busy, total) jiffies of our CPUs, and this process's own (all its threads)."""
        try:
            lines = (self.proc / "stat").read_text().splitlines()
            own = (self.proc / "self" / "stat").read_text()
        except OSError:
            return None
        mine = {f"cpu{n}" for n in self.cpus}
        busy = total = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in mine:
                # user nice system idle iowait irq softirq steal (guest time is within user)
                values = [int(v) for v in fields[1:9]]
                total += sum(values)
                busy += sum(values) - values[3] - values[4]
        stats = own.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return busy, total, int(stats[11]) + int(stats[12])  # utime, stime

    def sample(self) -> float | None:
        """Cores the others left free since the last sample (0 to len(cpus))."""
        now = self._ticks()
        last, self._last = self._last, now
        if now is None or last is None or not self.cpus or now[1] <= last[1]:
            return None
        per_cpu = (now[1] - last[1]) / len(self.cpus)  # jiffies one CPU had in the interval
        others = (now[0] - last[0]) - (now[2] - last[2])
        return min(len(self.cpus), max(0.0, len(self.cpus) - others / per_cpu))


def threads_for(free: float, most: int) -> int:
    """A thread per core that is free enough, at least 1, at most ``most``."""
    return max(1, min(most, int(free + 1 - FREE_ENOUGH)))


class ThreadGovernor:
    """Sets torch's thread count from ``FreeCores`` at most every ``every_s``, when called."""

    def __init__(
        self, every_s: float = 1.0, cores: FreeCores | None = None, on_change: Callable[[int], None] | None = None
    ) -> None:
        import torch

        self.torch = torch
        self.cores = cores or FreeCores()
        self.most = max(1, len(self.cores.cpus) or torch.get_num_threads())
        self.every_s = every_s
        self.on_change = on_change
        self.threads = torch.get_num_threads()
        self._due = time.monotonic() + every_s

    def __call__(self, *_: Any) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.every_s
        free = self.cores.sample()
        if free is None:
            return
        threads = threads_for(free, self.most)
        if threads != self.threads:
            log.debug("%.2f cores free: %d torch threads (was %d)", free, threads, self.threads)
            self.torch.set_num_threads(threads)
            self.threads = threads
            if self.on_change is not None:
                self.on_change(threads)


def follow_free_cores(
    every_s: float = 1.0, on_change: Callable[[int], None] | None = None, cores: FreeCores | None = None
) -> Callable[[], None]:
    """Install a ``ThreadGovernor`` on every module's forward; returns what removes it."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    governor = ThreadGovernor(every_s, cores, on_change)
    handle = register_module_forward_pre_hook(governor)
    return handle.remove
