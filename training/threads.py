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

``follow_free_cores`` turns it on, and the trainer's model loaders (``runtime.load_causal_lm``,
``RewardModel.from_causal_lm``) ``watch`` each model they load: a forward pre-hook on the model
itself (a global module hook put every submodule's call on torch's slow path: 3-7% slower
generation). Every forward (a training step's, each generated token's) runs on the training
thread, where torch's thread count is set, and the hook costs a clock read until the next check
is due. It never goes above the threads torch started with (one per physical core, or
OMP_NUM_THREADS) nor a cgroup's CPU quota.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
M = TypeVar("M", bound="torch.nn.Module")

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


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs a cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) lets this process use, if limited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


class ThreadGovernor:
    """Sets torch's thread count from ``FreeCores`` at most every ``every_s``, when called; never
    above the threads torch had (its default is one per physical core, or OMP_NUM_THREADS) nor a
    cgroup's CPU quota."""

    def __init__(
        self, every_s: float = 1.0, cores: FreeCores | None = None, on_change: Callable[[int], None] | None = None
    ) -> None:
        import torch

        self.cores = cores or FreeCores()
        self.start = torch.get_num_threads()
        quota = cpu_quota()
        most = min(len(self.cores.cpus) or self.start, self.start, math.ceil(quota) if quota else self.start)
        self.most = max(1, most)
        self.every_s = every_s
        self.on_change = on_change
        self.threads = self.start
        self._due = time.monotonic() + every_s
        self.off = False
        self._seconds: dict[int, float] = {}  # time spent at each thread count, up to _since
        self._since = time.monotonic()

    def __call__(self, *_: Any) -> None:
        now = time.monotonic()
        if now < self._due or self.off:
            return
        # The sample spans the time since the last one, however long: a forward can come a minute
        # after the last (a reward-model step beside serving took 45 s with 2 threads), and skipping
        # such samples as stale left the trainer at 2 threads for good.
        self._due = now + self.every_s
        try:
            free = self.cores.sample()
            if free is None:
                return
            threads = threads_for(free, self.most)
            if threads != self.threads:
                log.debug("%.2f cores free: %d torch threads (was %d)", free, threads, self.threads)
                self.set(threads)
        except Exception:  # a forward must not fail for this: keep the threads as they are
            log.exception("following the free cores failed; torch keeps %d threads", self.threads)
            self.off = True

    def set(self, threads: int) -> None:
        import torch

        now = time.monotonic()
        self._seconds[self.threads] = self._seconds.get(self.threads, 0.0) + now - self._since
        self._since = now
        torch.set_num_threads(threads)
        self.threads = threads
        if self.on_change is not None:
            self.on_change(threads)

    def seconds(self) -> dict[int, float]:
        """Seconds spent at each thread count since the governor started, up to now."""
        spent = dict(self._seconds)
        spent[self.threads] = spent.get(self.threads, 0.0) + time.monotonic() - self._since
        return spent

    # A watched model is copied (PPO's save merges a deep copy of a LoRA policy) and may be
    # pickled: the copy shares the one governor, and a pickled model carries a hook that does nothing.
    def __deepcopy__(self, memo: dict[int, Any]) -> ThreadGovernor:
        return self

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return _detached, ()


def _nothing(*_: Any) -> None:
    return None


def _detached() -> Callable[..., None]:
    """What an unpickled model's hook is: nothing (the governor belongs to the process that made it)."""
    return _nothing


_governor: ThreadGovernor | None = None  # the one follow_free_cores turned on


def follow_free_cores(
    every_s: float = 1.0, on_change: Callable[[int], None] | None = None, cores: FreeCores | None = None
) -> Callable[[], None]:
    """Follow the free cores at every forward of the models ``watch`` is given from now on;
    returns what stops it (and gives torch back the threads it had)."""
    global _governor
    governor = _governor = ThreadGovernor(every_s, cores, on_change)

    def stop() -> None:
        global _governor
        governor.off = True
        if _governor is governor:
            _governor = None
        governor.set(governor.start)

    return stop


def thread_seconds() -> dict[int, float] | None:
    """Seconds at each torch thread count while following the free cores (None: not following);
    the difference of two calls is where a stretch of work spent its time."""
    return _governor.seconds() if _governor is not None else None


def watch(model: M) -> M:
    """``model``'s forwards set torch's threads while ``follow_free_cores`` is on (else: nothing)."""
    if _governor is not None:
        model.register_forward_pre_hook(_governor)
    return model
