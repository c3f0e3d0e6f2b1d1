"""OpenTelemetry spans over OTLP (``--otlp-traces-endpoint``): a completion's request, its wait
in the queue, its generation and its log write, children of the caller's W3C traceparent, so
they join the app's own traces; vLLM's engine exports its own ``llm_request`` span under
heed's. Off (no endpoint): every call here is a no-op and nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME = "heed"


class Tracing:
    """heed's tracer: its own provider (vLLM sets the process-wide one for its engine spans) and
    a batching OTLP gRPC exporter, so a span costs the request path a queue append."""

    def __init__(self, endpoint: str = "") -> None:
        self.endpoint = endpoint
        self._provider: Any = None
        self._tracer: Any = None
        if not endpoint:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        self._tracer = self._provider.get_tracer("heed.serving")
        log.info("exporting OpenTelemetry spans to %s", endpoint)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def completion(self, trace: dict[str, str] | None, name: str, attributes: dict[str, Any]) -> CompletionSpans:
        """The spans of one completion, under the caller's traceparent (if it sent one)."""
        return CompletionSpans(self, trace, name, attributes)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes what is queued


class CompletionSpans:
    """A completion's spans, built from the times it went through: the request (from receipt to
    logged), the queue (receipt to the engine's first output), the generation (first output to
    last) and the log write. ``engine_headers`` carries the request span's context to vLLM."""

    def __init__(self, tracing: Tracing, trace: dict[str, str] | None, name: str, attributes: dict[str, Any]) -> None:
        self.tracing = tracing
        self.started_ns = time.time_ns()
        self.first_output_ns: int | None = None
        self.generated_ns: int | None = None
        self._span: Any = None  # None: off, or ended
        if not tracing.enabled:
            return
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(
            {k: v for k, v in (trace or {}).items() if k in ("traceparent", "tracestate")}
        )
        self._span = tracing._tracer.start_span(name, context=parent, start_time=self.started_ns, attributes=attributes)

    def engine_headers(self) -> dict[str, str] | None:
        """The W3C headers that make vLLM's engine span a child of this request's span."""
        if self._span is None:
            return None
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(headers, context=trace.set_span_in_context(self._span))
        return headers

    def output(self) -> None:
        """An engine output arrived."""
        if self._span is None:
            return
        now = time.time_ns()
        if self.first_output_ns is None:
            self.first_output_ns = now
        self.generated_ns = now

    def _child(self, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any] | None = None) -> None:
        from opentelemetry import trace

        context = trace.set_span_in_context(self._span)
        span = self.tracing._tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)

    def logged(self, write_started_ns: int, attributes: dict[str, Any]) -> None:
        """The completion is in the log: the children, and the request span, end."""
        if self._span is None:
            return
        now = time.time_ns()
        first = self.first_output_ns or write_started_ns
        self._child("heed.queue", self.started_ns, first)
        self._child("heed.generation", first, self.generated_ns or write_started_ns)
        self._child("heed.event_log.write", write_started_ns, now)
        self._span.set_attributes(attributes)
        self._span.end(end_time=now)
        self._span = None

    def failed(self, error: BaseException) -> None:
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self._span.end()
        self._span = None
