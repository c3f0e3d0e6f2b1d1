"""Operations: health, readiness, Prometheus metrics, the OpenAPI document, generated stubs."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def samples(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(server.http_url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= set(ls))


def test_health_and_ready(http) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready").json()
    assert ready["ready"] is True and ready["slots"]["stable"]["policy_version"] == "tiny-v1"


def test_metrics_count_requests_tokens_and_feedback_by_version(http, server) -> None:
    before = samples(server)
    completion = http.post("/v1/completions", json={"model": "heed", "prompt": "m", "max_tokens": 4}).json()
    http.post("/v1/feedback", json={"completion_id": completion["id"], "thumb": 1})
    http.post("/v1/completions", json={"model": "heed", "prompt": "m", "temperature": 7})
    after = samples(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"api": "http", "endpoint": "/v1/completions", "status": "200", "policy_version": "tiny-v1"}
    assert delta("heed_requests_total", **ok) == 1
    assert delta("heed_requests_total", api="http", endpoint="/v1/completions", status="400") == 1
    assert delta("heed_request_duration_seconds_count", **ok) == 1
    assert delta("heed_time_to_first_token_seconds_count", policy_version="tiny-v1") == 1
    assert delta("heed_generated_tokens_total", policy_version="tiny-v1") == 4
    assert delta("heed_feedback_events_total", kind="thumb", policy_version="tiny-v1") == 1
    assert delta("heed_feedback_thumbs_total", direction="up", policy_version="tiny-v1") == 1
    up = value(after, "heed_feedback_thumbs_total", direction="up", policy_version="tiny-v1")
    down = value(after, "heed_feedback_thumbs_total", direction="down", policy_version="tiny-v1")
    assert abs(value(after, "heed_thumbs_up_ratio", policy_version="tiny-v1") - up / (up + down)) < 1e-9
    assert value(after, "heed_engine_ready", slot="stable", policy_version="tiny-v1") == 1


def test_each_slots_engine_figures_are_exposed_with_its_slot_and_version(http, server) -> None:
    before = samples(server)
    answer = http.post("/v1/completions", json={"model": "heed", "prompt": "e", "max_tokens": 6, "n": 2})
    assert answer.status_code == 200
    after = samples(server)
    stable = {"slot": "stable", "policy_version": "tiny-v1"}

    def delta(name: str) -> float:
        return value(after, name, **stable) - value(before, name, **stable)

    assert delta("heed_engine_time_to_first_token_seconds_count") == 2  # one per sequence
    assert delta("heed_engine_inter_token_latency_seconds_count") == 2 * 5  # the tokens after the first
    assert delta("heed_engine_request_queue_time_seconds_count") >= 1
    assert value(after, "heed_engine_requests_running", **stable) == 0  # nothing in flight now
    assert value(after, "heed_engine_requests_waiting", **stable) == 0
    assert 0 <= value(after, "heed_engine_kv_cache_usage_ratio", **stable) <= 1
    # Latency buckets reach long generations (minutes on a CPU), not +Inf past 80 s.
    bounds = {float(dict(ls)["le"]) for (n, ls), _ in after.items() if n == "heed_request_duration_seconds_bucket"}
    assert max(b for b in bounds if b != float("inf")) >= 1800


def test_openapi_document_describes_every_route_with_resolvable_schemas(http) -> None:
    doc = http.get("/openapi.json").json()

    assert doc["openapi"].startswith("3.1")
    assert {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/feedback",
        "/v1/models",
        "/v1/completions/{completion_id}",
        "/admin/rollout",
        "/admin/rollout/{action}",
        "/admin/registry",
        "/ui/api/meta",
        "/ui/api/prompts",
        "/ui/api/dashboard",
    } <= set(doc["paths"])
    assert doc["paths"]["/admin/rollout"]["get"]["security"] == [{"admin": []}]
    schemas = doc["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/feedback"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in schemas
    assert "prompt" in schemas["CompletionBody"]["required"]


def test_generated_stubs_match_the_proto_contract(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("build_hook", ROOT / "protos" / "build_hook.py")
    assert spec and spec.loader
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    (tmp_path / "protos").symlink_to(ROOT / "protos")

    written = hook.generate(tmp_path)

    assert written
    for path in written:
        assert filecmp.cmp(path, ROOT / "heed" / "v1" / path.name, shallow=False), f"{path.name} is stale"
