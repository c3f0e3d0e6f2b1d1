"""Hot swap and rollout operations on a running server: a swapped engine answers exactly as a
fresh engine on the new version (tied and untied output layers), no request fails while weights
are swapped under load, a corrupted or incompatible version is refused while the old weights keep
serving, routing is sticky and pinnable, and the admin API needs its own key."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest

from heed.callers import sticky_bucket
from heed.models import build_tiny_llama
from heed.registry import PolicyRegistry
from heed.rollout import PIN_HEADER
from heed.v1 import rollout_pb2, rollout_pb2_grpc
from tests.conftest import ARTIFACTS, KEYS, RunningServer, start_server

ADMIN = {"ops": "sk-admin-ops"}
PROMPTS = ["The weather today", "Once upon a time", "def main():"]


@pytest.fixture(scope="module", params=["tied", "untied"])
def swap_server(request, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    tied = request.param == "tied"
    root = tmp_path_factory.mktemp(f"swap-{request.param}")
    models = {
        name: build_tiny_llama(root / name, tokenizer_dir, seed=seed, tie_word_embeddings=tied)
        for name, seed in (("base", 0), ("b", 1), ("c", 2))
    }
    server = start_server(
        models["base"],
        root / "data",
        ARTIFACTS / f"server-swap-{request.param}.log",
        KEYS,
        "--registry-poll-s", "0", "--rollout-interval-s", "0.5", "--canary-steps", "50,100",
        "--min-feedback-per-step", "100000", "--canary-slot", "lazy", "--pin-principals", "alice",
        "--user-principals", "alice",  # routed by the end user it names
        admin_keys=ADMIN,
    )  # fmt: skip
    server.tied = tied  # type: ignore[attr-defined]
    server.models = models  # type: ignore[attr-defined]
    server.registry = PolicyRegistry(server.data.registry)  # type: ignore[attr-defined]
    yield server
    server.stop()
    assert server.process.returncode == 0, server.log_text()[-3000:]


def admin(server: RunningServer, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, server.http_url + path, json=body, headers=server.admin_headers(), timeout=300)


def status(server: RunningServer) -> dict:
    response = admin(server, "GET", "/admin/rollout")
    assert response.status_code == 200, response.text
    return response.json()


def publish(server: RunningServer, model: str) -> str:
    registry: PolicyRegistry = server.registry  # type: ignore[attr-defined]
    return registry.publish(server.models[model], parent=status(server)["stable"]).version  # type: ignore[attr-defined]


def no_canary(server: RunningServer) -> None:
    if status(server)["canary"]:
        assert admin(server, "POST", "/admin/rollout/rollback").status_code == 200


def greedy(server: RunningServer, prompt: str, pin: str | None = None, user: str = "probe") -> dict:
    headers = {**server.headers(), **({PIN_HEADER: pin} if pin else {})}
    body = {"model": "heed", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5, "user": user}
    response = httpx.post(server.http_url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_output(a: dict, b: dict) -> None:
    la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
    assert la["tokens"] == lb["tokens"]
    for top_a, top_b in zip(la["top_logprobs"], lb["top_logprobs"], strict=True):
        assert top_a.keys() == top_b.keys()
        for token in top_a:
            assert abs(top_a[token] - top_b[token]) < 1e-3, (token, top_a[token], top_b[token])


def test_after_a_swap_greedy_output_equals_a_fresh_engine_on_the_new_version(swap_server: RunningServer) -> None:
    server = swap_server
    base = status(server)["stable"]
    before = [greedy(server, p) for p in PROMPTS]
    v2 = publish(server, "b")
    started = admin(server, "POST", "/admin/rollout/canary", {"version": v2})
    assert started.status_code == 200, started.text
    # The canary slot's first engine starts fresh on v2: the reference output.
    fresh = [greedy(server, p, pin=v2) for p in PROMPTS]
    assert all(f["model"] == v2 for f in fresh)
    assert any(
        b["choices"][0]["logprobs"]["top_logprobs"] != f["choices"][0]["logprobs"]["top_logprobs"]
        for b, f in zip(before, fresh, strict=True)
    ), "the two versions must answer differently for the comparison to mean anything"

    promoted = admin(server, "POST", "/admin/rollout/promote")
    assert promoted.status_code == 200, promoted.text
    assert (promoted.json()["stable"], promoted.json()["canary"]) == (v2, None)
    assert promoted.json()["slots"]["stable"]["policy_version"] == v2
    swapped = [greedy(server, p) for p in PROMPTS]  # no canary now: the stable slot answers

    for s, f in zip(swapped, fresh, strict=True):
        assert s["model"] == v2
        assert_same_output(s, f)
    assert base != v2


def test_requests_during_swaps_all_succeed_and_are_logged_with_the_version_that_answered(
    swap_server: RunningServer,
) -> None:
    server = swap_server
    no_canary(server)
    v3 = publish(server, "c")
    results: list[tuple[int, str, str]] = []  # (status, model, completion id)
    stop = threading.Event()

    def user_traffic(worker: int) -> None:
        with httpx.Client(base_url=server.http_url, headers=server.headers(), timeout=120) as http:
            i = 0
            while not stop.is_set():
                body = {"model": "heed", "prompt": f"load {worker}-{i}", "max_tokens": 6, "user": f"u{worker}-{i % 7}"}
                if i % 2:
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
                        first = json.loads(lines[0][6:]) if lines else {}
                        results.append((response.status_code, first.get("model", ""), first.get("id", "")))
                else:
                    response = http.post("/v1/completions", json=body)
                    data = response.json()
                    results.append((response.status_code, data.get("model", ""), data.get("id", "")))
                i += 1

    workers = [threading.Thread(target=user_traffic, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(1)
        stable = status(server)["stable"]
        for action, body in (("canary", {"version": v3}), ("rollback", None), ("canary", {"version": v3})):
            response = admin(server, "POST", f"/admin/rollout/{action}", body)
            assert response.status_code == 200, response.text
            time.sleep(1.5)
        assert admin(server, "POST", "/admin/rollout/promote").status_code == 200
        time.sleep(1.5)
    finally:
        stop.set()
        for w in workers:
            w.join()

    assert len(results) > 20
    assert [r for r in results if r[0] != 200] == []
    assert Counter(r[1] for r in results).keys() <= {stable, v3} and {stable, v3} <= {r[1] for r in results}
    with httpx.Client(base_url=server.http_url, headers=server.headers(), timeout=60) as http:
        for _, model, completion_id in results[::5]:
            logged = http.get(f"/v1/completions/{completion_id}")
            assert logged.status_code == 200 and logged.json()["policy_version"] == model
    metrics = httpx.get(server.http_url + "/metrics").text
    swaps = [line for line in metrics.splitlines() if line.startswith("heed_policy_swaps_total{")]
    assert sum(float(line.split()[-1]) for line in swaps if 'result="ok"' in line) >= 3


def test_corrupted_or_incompatible_versions_are_refused_and_the_old_weights_keep_serving(
    swap_server: RunningServer, tmp_path: Path, tokenizer_dir: Path
) -> None:
    server = swap_server
    no_canary(server)
    stable = status(server)["stable"]
    before = greedy(server, PROMPTS[0])
    registry: PolicyRegistry = server.registry  # type: ignore[attr-defined]

    corrupt = publish(server, "b")
    weights = registry.root / corrupt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    refused = admin(server, "POST", "/admin/rollout/canary", {"version": corrupt})
    assert refused.status_code == 400 and "does not match its sha256" in refused.json()["error"]["message"]

    # Half-written: a copy onto the registry's storage cut short (its manifest landed, its weights did not).
    half = publish(server, "c")
    weights = registry.root / half / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    refused = admin(server, "POST", "/admin/rollout/canary", {"version": half})
    assert refused.status_code == 400 and "does not match its sha256" in refused.json()["error"]["message"]

    wide = build_tiny_llama(tmp_path / "wide", tokenizer_dir, seed=3, hidden_size=256, tie_word_embeddings=server.tied)  # type: ignore[attr-defined]
    incompatible = registry.publish(wide).version
    refused = admin(server, "POST", "/admin/rollout/canary", {"version": incompatible})
    assert refused.status_code == 400 and "hidden_size" in refused.json()["error"]["message"]

    after = status(server)
    assert [d["action"] for d in after["history"][-3:]] == ["refused", "refused", "refused"]
    assert after["stable"] == stable and after["canary"] is None
    assert_same_output(greedy(server, PROMPTS[0]), before)
    metrics = httpx.get(server.http_url + "/metrics").text
    failures = [line for line in metrics.splitlines() if line.startswith("heed_policy_load_failures_total")]
    assert failures and float(failures[0].split()[-1]) >= 3
    assert "refusing policy version" in server.log_text()
    missing = admin(server, "POST", "/admin/rollout/canary")  # no body: what is missing is the version
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "version"


def test_canary_routing_is_sticky_per_caller_and_a_header_pins_a_version(swap_server: RunningServer) -> None:
    server = swap_server
    if not server.tied:  # type: ignore[attr-defined]
        pytest.skip("routing does not depend on the model; checked once")
    no_canary(server)
    stable = status(server)["stable"]
    canary = publish(server, "b" if stable != "v2" else "c")
    assert admin(server, "POST", "/admin/rollout/canary", {"version": canary}).status_code == 200
    share = status(server)["canary_share"]

    users = [f"user-{i}" for i in range(24)]
    first = {u: greedy(server, "hi", user=u)["model"] for u in users}
    again = {u: greedy(server, "hello", user=u)["model"] for u in users}
    assert first == again  # sticky
    assert first == {u: canary if sticky_bucket(u) < share * 100 else stable for u in users}
    assert set(first.values()) == {stable, canary}
    pinned = [greedy(server, "hi", pin=stable, user=u)["model"] for u in users[:6]]
    assert set(pinned) == {stable}
    models = httpx.get(server.http_url + "/v1/models", headers=server.headers()).json()
    assert {m["id"] for m in models["data"]} == {"heed", stable, canary}


def test_the_admin_api_needs_an_admin_key_distinct_from_api_keys(swap_server: RunningServer) -> None:
    server = swap_server
    if not server.tied:  # type: ignore[attr-defined]
        pytest.skip("auth does not depend on the model; checked once")
    url = server.http_url + "/admin/rollout"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=server.headers("alice")).status_code == 401
    assert httpx.post(url + "/pause", headers=server.headers("alice")).status_code == 401
    completion = httpx.post(
        server.http_url + "/v1/completions", json={"model": "heed", "prompt": "x"}, headers=server.admin_headers()
    )
    assert completion.status_code == 401 and completion.json()["error"]["type"] == "authentication_error"

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)
        as_admin = [("authorization", f"Bearer {ADMIN['ops']}")]
        reply = stub.GetStatus(rollout_pb2.StatusRequest(), metadata=as_admin)
        assert reply.stable and reply.history[0].action == "initialised"
        listed = stub.ListVersions(rollout_pb2.ListVersionsRequest(), metadata=as_admin)
        assert listed.versions[0].source == "import"
        with pytest.raises(grpc.RpcError) as denied:
            stub.Promote(rollout_pb2.ActionRequest(), metadata=[("authorization", f"Bearer {KEYS['alice']}")])
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_heed_rollout_cli_shows_and_steers_the_rollout(swap_server: RunningServer) -> None:
    server = swap_server
    if not server.tied:  # type: ignore[attr-defined]
        pytest.skip("the CLI does not depend on the model; checked once")

    def heed(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "heed", "rollout", *args, "--url", server.http_url]
        return subprocess.run([*command, "--admin-key", ADMIN["ops"]], capture_output=True, text=True, timeout=120)

    shown = heed("status")
    assert shown.returncode == 0, shown.stderr
    assert f"stable  {status(server)['stable']}" in shown.stdout
    paused = heed("pause", "--json")
    assert paused.returncode == 0 and json.loads(paused.stdout)["paused"] is True
    assert heed("resume", "--json").returncode == 0 and status(server)["paused"] is False
    no_canary(server)
    refused = heed("promote")
    assert refused.returncode == 2 and "no canary" in refused.stderr
