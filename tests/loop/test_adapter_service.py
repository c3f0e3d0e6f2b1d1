"""Adapter mode through the real service: `heed serve --policy-mode adapter` runs one vLLM engine
with LoRA on the base; versions are published as peft adapters, canaried, promoted and rolled
back by re-pointing, and a request asking for a version is answered by it, also while another
version's adapter loads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from heed.registry import PolicyRegistry
from heed.rollout import PIN_HEADER, load_state
from heed.v1 import rollout_pb2, rollout_pb2_grpc
from tests.conftest import ARTIFACTS, KEYS, RunningServer, start_server
from tests.loop.test_swap import admin, status
from tests.training.test_adapters import random_adapter

pytestmark = pytest.mark.slow

ADMIN = {"ops": "sk-admin-ops"}
PROMPTS = ["The weather today", "Once upon a time", "def main():"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("adapter-service")
    running = start_server(
        tiny_model,
        root / "data",
        ARTIFACTS / "server-adapters.log",
        KEYS,
        "--policy-mode", "adapter", "--registry-poll-s", "0", "--rollout-interval-s", "0.5",
        "--canary-steps", "50,100", "--min-feedback-per-step", "100000", "--pin-principals", "alice",
        admin_keys=ADMIN, timeout=600,
    )  # fmt: skip
    running.adapters = {  # type: ignore[attr-defined]
        name: random_adapter(tiny_model, root / name, seed=seed) for name, seed in (("a", 1), ("b", 2))
    }
    yield running
    running.stop()
    assert running.process.returncode == 0, running.log_text()[-3000:]


def publish(server: RunningServer, adapter: str) -> str:
    registry = PolicyRegistry(server.data.registry)
    stable = status(server)["stable"]
    base = registry.manifest(stable).base or stable
    return registry.publish(server.adapters[adapter], mode="adapter", base=base, parent=stable).version  # type: ignore[attr-defined]


def completion(server: RunningServer, prompt: str, pin: str | None = None) -> httpx.Response:
    headers = {**server.headers(), **({PIN_HEADER: pin} if pin else {})}
    body = {"model": "heed", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3, "user": "probe"}
    return httpx.post(server.http_url + "/v1/completions", json=body, headers=headers, timeout=120)


def greedy(server: RunningServer, pin: str | None = None) -> list[tuple[str, list[str]]]:
    """Each prompt's (version that answered, greedy tokens)."""
    answers = []
    for prompt in PROMPTS:
        response = completion(server, prompt, pin)
        assert response.status_code == 200, response.text
        data = response.json()
        answers.append((data["model"], data["choices"][0]["logprobs"]["tokens"]))
    return answers


def engine_cores(server: RunningServer) -> int:
    tree = psutil.Process(server.process.pid).children(recursive=True)
    return sum("EngineCore" in p.name() for p in tree)


def test_one_engine_serves_each_version_as_itself_while_another_loads_and_decisions_re_point(
    server: RunningServer,
) -> None:
    base = status(server)["stable"]
    assert status(server)["mode"] == "adapter" and load_state(server.data.root).mode == "adapter"
    at_base = greedy(server)
    assert {v for v, _ in at_base} == {base}

    v2 = publish(server, "a")
    started = admin(server, "POST", "/admin/rollout/canary", {"version": v2})
    assert started.status_code == 200, started.text
    load_seconds = started.json()["history"][-1]["evidence"]["load_seconds"]
    print(f"published to canary serving: {load_seconds:.3f} s")
    assert load_seconds < 10  # an adapter added between engine steps, no engine start
    at_v2 = greedy(server, pin=v2)
    assert {v for v, _ in at_v2} == {v2}
    assert [t for _, t in at_v2] != [t for _, t in at_base], "v2 must answer differently for the test to mean anything"
    assert greedy(server, pin=base) == at_base  # the base, beside it in the same engine

    promoted = admin(server, "POST", "/admin/rollout/promote")
    assert promoted.status_code == 200, promoted.text
    after = status(server)
    assert (after["stable"], after["canary"]) == (v2, None)
    assert not any(slot["swapping"] for slot in after["slots"].values())
    assert greedy(server) == at_v2  # the alias now answers as v2, exactly

    # v3 loads while requests pinned to v2 run: every one is answered by v2, exactly as before.
    v3 = publish(server, "b")
    assert completion(server, PROMPTS[0], pin=v3).status_code == 404  # not served before its canary starts
    # Each pinned answer: (sent, answered, prompt's index, version, tokens), or what went wrong.
    answers: list[tuple[float, float, int, str, list[str]]] = []
    errors: list[str] = []
    stop = threading.Event()

    def pinned_to_v2(worker: int) -> None:
        while not stop.is_set():
            i = (worker + len(answers)) % len(PROMPTS)
            sent = time.monotonic()
            try:
                response = completion(server, PROMPTS[i], pin=v2)
            except Exception as error:  # the main thread asserts: a worker's exception would be lost
                errors.append(repr(error))
                continue
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text[:200]}")
                continue
            data = response.json()
            answers.append((sent, time.monotonic(), i, data["model"], data["choices"][0]["logprobs"]["tokens"]))

    workers = [threading.Thread(target=pinned_to_v2, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    try:
        while not answers and not errors:  # the pinned requests are flowing before v3 loads
            time.sleep(0.01)
        loading = time.monotonic()
        started = admin(server, "POST", "/admin/rollout/canary", {"version": v3})
        loaded = time.monotonic()
        time.sleep(0.5)  # and go on after it
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert started.status_code == 200, started.text
    assert errors == []
    during = [a for a in answers if a[0] < loaded and a[1] > loading]
    assert during, f"no pinned request was in flight while v3 loaded ({loaded - loading:.3f} s)"
    wrong = [(i, version) for _, _, i, version, tokens in answers if (version, tokens) != at_v2[i]]
    assert wrong == [], f"{len(wrong)} of {len(answers)} pinned answers not v2's ({len(during)} during the load)"
    at_v3 = greedy(server, pin=v3)
    assert {v for v, _ in at_v3} == {v3} and [t for _, t in at_v3] != [t for _, t in at_v2]

    rolled = admin(server, "POST", "/admin/rollout/rollback")
    assert rolled.status_code == 200, rolled.text
    final = status(server)
    assert (final["stable"], final["canary"]) == (v2, None)
    assert all(slot["policy_version"] == v2 for slot in final["slots"].values())
    assert completion(server, PROMPTS[0], pin=v3).status_code == 404  # its view re-pointed to stable
    assert greedy(server) == at_v2
    assert engine_cores(server) == 1  # stable, canary, previous and base: one engine

    with grpc.insecure_channel(server.grpc_target) as channel:  # the gRPC surface says the same
        stub = rollout_pb2_grpc.RolloutStub(channel)
        as_admin = [("authorization", f"Bearer {ADMIN['ops']}")]
        assert stub.GetStatus(rollout_pb2.StatusRequest(), metadata=as_admin).mode == "adapter"
        listed = stub.ListVersions(rollout_pb2.ListVersionsRequest(), metadata=as_admin).versions
        assert {(v.version, v.mode, v.base) for v in listed} == {
            (base, "full", ""),
            (v2, "adapter", base),
            (v3, "adapter", base),
        }
