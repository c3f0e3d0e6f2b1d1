"""The trainer's torch threads follow the cores the rest of the machine leaves free."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import runtime
from training.reward import RewardModel
from training.threads import FreeCores, ThreadGovernor, cpu_quota, follow_free_cores, threads_for, watch


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


def write_stat(proc: Path, cpus: dict[str, list[int]], own: tuple[int, int]) -> None:
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"{name} {' '.join(map(str, v))} 0 0" for name, v in cpus.items()]
    (proc / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\n")
    (proc / "self").mkdir(exist_ok=True)
    fields = ["S"] + ["0"] * 10 + [str(own[0]), str(own[1])] + ["0"] * 30
    (proc / "self" / "stat").write_text(f"4242 (python (a) b) {' '.join(fields)}\n")


def test_free_cores_are_the_cpus_less_the_others_busy_time_on_them(tmp_path: Path) -> None:
    """Jiffies of /proc/stat: user nice system idle iowait irq softirq steal, per CPU; only the
    CPUs this process may use count, and its own utime + stime is not the others'."""
    write_stat(tmp_path, {"cpu0": [0] * 8, "cpu1": [0] * 8, "cpu7": [0] * 8}, own=(0, 0))
    cores = FreeCores(tmp_path)
    cores.cpus = [0, 1]
    cores._last = cores._ticks()
    # 100 jiffies each: cpu0 80 busy (user 50, system 20, irq 5, steal 5) and 20 idle + iowait;
    # cpu1 30 busy; of the 110 busy, 40 are ours (utime 30, stime 10); cpu7 is not ours to use.
    write_stat(
        tmp_path,
        {"cpu0": [50, 0, 20, 15, 5, 5, 0, 5], "cpu1": [20, 10, 0, 70, 0, 0, 0, 0], "cpu7": [100, 0, 0, 0, 0, 0, 0, 0]},
        own=(30, 10),
    )
    assert cores.sample() == pytest.approx(2 - 70 / 100)
    assert cores.sample() is None  # no time passed between the two


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores: one to keep busy, one to measure from")
def test_a_busy_neighbour_takes_a_core_from_what_is_free() -> None:
    quiet = free_over(1.5)
    if quiet < 1.5:
        pytest.skip(f"the machine is busy ({quiet:.2f} cores free): a neighbour's core cannot be told apart")
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


def test_every_forward_of_a_watched_model_sets_the_threads_from_the_free_cores_until_stopped(
    torch_threads: int,
) -> None:
    cores, seen = Free(0.3), []
    torch.set_num_threads(2)
    unwatched = watch(torch.nn.Linear(4, 4))  # before: nothing to follow
    unfollow = follow_free_cores(every_s=0, on_change=seen.append, cores=cores)
    layer = watch(torch.nn.Linear(4, 4))
    try:
        unwatched(torch.ones(1, 4))
        assert torch.get_num_threads() == 2 and seen == []
        layer(torch.ones(1, 4))
        assert torch.get_num_threads() == 1
        cores.free = 2.0
        layer(torch.ones(1, 4))
        assert torch.get_num_threads() == 2
        assert seen == [1, 2]
        cores.free = 0.3
        layer(torch.ones(1, 4))
    finally:
        unfollow()
    assert torch.get_num_threads() == 2 and seen == [1, 2, 1, 2]  # as it was before
    layer(torch.ones(1, 4))
    assert torch.get_num_threads() == 2 and seen == [1, 2, 1, 2]


def test_no_more_threads_than_torch_started_with_and_a_sample_however_long_counts(torch_threads: int) -> None:
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 would
    cores, seen = Free(2.0), []
    unfollow = follow_free_cores(every_s=0, on_change=seen.append, cores=cores)
    try:
        watch(torch.nn.Linear(4, 4))(torch.ones(1, 4))
        assert torch.get_num_threads() == 1 and seen == []
    finally:
        unfollow()
    torch.set_num_threads(2)
    cores = Free(0.3)
    governor = ThreadGovernor(every_s=0.05, cores=cores)
    governor()
    assert torch.get_num_threads() == 2  # not yet due
    time.sleep(0.3)  # six periods: the next forward of a slow step
    governor()
    assert torch.get_num_threads() == 1


def test_a_cgroup_quota_in_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert cpu_quota(tmp_path) == 2.0
    assert cpu_quota(tmp_path / "nothing") is None


def test_the_models_the_trainer_loads_are_watched(tiny_model: Path, torch_threads: int) -> None:
    """The policy, reference and value/reward models come through these two loaders."""
    torch.set_num_threads(2)
    cores, seen = Free(0.3), []
    unfollow = follow_free_cores(every_s=0, on_change=seen.append, cores=cores)
    try:
        policy = runtime.load_causal_lm(tiny_model, trainable=False)
        reward_model = RewardModel.from_causal_lm(tiny_model)
        ids = torch.tensor([[1, 2, 3]])
        policy(input_ids=ids)
        cores.free = 2.0
        reward_model.score(ids, torch.ones_like(ids))
        cores.free = 0.3
        copy.deepcopy(policy)(input_ids=ids)  # PPO's save merges a deep copy of a LoRA policy
        assert seen == [1, 2, 1]  # the copy shares the governor
        pickle.loads(pickle.dumps(reward_model)).score(ids, torch.ones_like(ids))
        assert seen == [1, 2, 1]  # an unpickled model's hook does nothing
    finally:
        unfollow()
    assert seen == [1, 2, 1, 2]  # stopped: torch's threads as they were


def test_a_rounds_stage_records_its_seconds_at_each_thread_count(torch_threads: int) -> None:
    """Where a slow stage spent its time: the round report's stages say how long they computed at
    each torch thread count (seen: a reward model at 64 s in one run, 130 s in the next)."""
    import threading

    from training.round import _stage

    torch.set_num_threads(2)
    cores, stages = Free(2.0), {}
    unfollow = follow_free_cores(every_s=0, cores=cores)
    layer = watch(torch.nn.Linear(4, 4))
    try:
        with _stage(stages, "reward_model", threading.Event()):
            time.sleep(0.2)  # at 2 threads
            cores.free = 0.3
            layer(torch.ones(1, 4))
            time.sleep(0.4)  # at 1
        with _stage(stages, "ppo", threading.Event()):
            time.sleep(0.1)
    finally:
        unfollow()
    spent = stages["reward_model"]["torch_threads_s"]
    assert set(spent) == {"1", "2"} and spent["2"] == pytest.approx(0.2, abs=0.08)
    assert spent["1"] == pytest.approx(0.4, abs=0.08)
    assert set(stages["ppo"]["torch_threads_s"]) == {"1"}
    stages.clear()
    with _stage(stages, "data", threading.Event()):  # not following: nothing to say
        pass
    assert "torch_threads_s" not in stages["data"]
