"""OpenTelemetry export: a completion's spans reach a real OTLP collector (gRPC) under the
caller's traceparent."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import ARTIFACTS, KEYS, start_server

pytestmark = pytest.mark.slow  # boots an engine of its own

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.received = threading.Condition()

    def Export(self, request, context):  # noqa: N802
        with self.received:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend((resource.resource, span) for span in scope.spans)
            self.received.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, names: set[str], requests: int = 1, timeout_s: float = 30.0) -> dict[str, list]:
        """The spans so far, once every name has come and ``requests`` request spans have (the
        exporter sends in batches: one request's spans may come after another's)."""
        deadline = time.monotonic() + timeout_s

        def arrived() -> bool:
            seen = [span.name for _, span in self.spans]
            return names <= set(seen) and seen.count("heed.completion") >= requests

        with self.received:
            while not arrived():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.received.wait(left)
            found: dict[str, list] = {}
            for resource, span in self.spans:
                found.setdefault(span.name, []).append((resource, span))
            return found


@pytest.fixture
def collector():
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


def test_a_completions_spans_reach_the_collector_under_the_callers_trace(tiny_model: Path, tmp_path, collector) -> None:
    receiver, endpoint = collector
    running = start_server(
        tiny_model,
        tmp_path / "data",
        ARTIFACTS / "tracing-server.log",
        KEYS,
        "--otlp-traces-endpoint",
        endpoint,
        env={"OTEL_BSP_SCHEDULE_DELAY": "200"},  # export every 0.2 s, not every 5 s
    )
    try:
        with httpx.Client(base_url=running.http_url, headers=running.headers("alice"), timeout=60) as http:
            answer = http.post(
                "/v1/completions",
                json={"model": "heed", "prompt": "Trace", "max_tokens": 4},
                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"},
            )
            assert answer.status_code == 200
            untraced = http.post("/v1/completions", json={"model": "heed", "prompt": "Plain", "max_tokens": 2})
            assert untraced.status_code == 200
        spans = receiver.wait_for(
            {"heed.completion", "heed.queue", "heed.generation", "heed.event_log.write", "llm_request"}, requests=2
        )
    finally:
        running.stop()

    requests = {s.trace_id.hex(): s for _, s in spans["heed.completion"]}
    request = requests[TRACE_ID]  # the caller's trace, continued
    assert request.parent_span_id.hex() == PARENT_SPAN
    assert len(requests) == 2  # the untraced request starts a trace of its own
    attributes = {a.key: a.value.string_value for a in request.attributes if a.value.string_value}
    assert attributes["heed.completion_id"] == answer.json()["id"]
    assert attributes["heed.policy_version"] == "tiny-v1"
    children = {
        name: span
        for name in ("heed.queue", "heed.generation", "heed.event_log.write")
        for _, span in spans[name]
        if span.trace_id.hex() == TRACE_ID
    }
    assert {s.parent_span_id for s in children.values()} == {request.span_id}
    assert request.start_time_unix_nano <= children["heed.queue"].start_time_unix_nano
    assert children["heed.queue"].end_time_unix_nano <= children["heed.generation"].end_time_unix_nano
    assert children["heed.event_log.write"].end_time_unix_nano <= request.end_time_unix_nano
    (resource, _) = spans["heed.completion"][0]
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "heed"
    # vLLM's own engine span, under heed's request span
    engine = [s for _, s in spans.get("llm_request", []) if s.trace_id.hex() == TRACE_ID]
    assert [s.parent_span_id for s in engine] == [request.span_id]
