"""The gRPC surface: heed.v1.Completions and heed.v1.Feedback over the same core as HTTP,
plus the standard health service and server reflection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from heed.rollout import PIN_HEADER, AdminAction, RolloutStatus
from heed.v1 import (
    completions_pb2,
    completions_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)
from serving.auth import admin_principal
from serving.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from serving.feedback import FeedbackInput
from serving.requests import (
    ChoiceDelta,
    ChoiceResult,
    CompletionResult,
    GenerationRequest,
    TokenLogprob,
    strict_json,
    trace_context,
)
from serving.service import Service
from serving.service import health as service_health

log = logging.getLogger(__name__)

_STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,  # the rollout is not in a state the action applies to
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}
SERVICE_NAMES = (
    completions_pb2.DESCRIPTOR.services_by_name["Completions"].full_name,
    feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name,
    rollout_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name,
)
# Conflicts whose code says more than their class: a reused idempotency key names what exists, and
# a rollout another replica or admin changed meanwhile is a concurrency conflict (retry on a fresh read).
_STATUS_BY_CODE = {
    "idempotency_key_reused": grpc.StatusCode.ALREADY_EXISTS,
    "rollout_changed": grpc.StatusCode.ABORTED,
}


def status_code(exc: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a service error (its HTTP status's counterpart)."""
    return _STATUS_BY_CODE.get(exc.code or "") or _STATUS.get(type(exc), grpc.StatusCode.INTERNAL)


# Pins a request for the service alias to one served policy version (for testing a canary).
PIN_METADATA = PIN_HEADER.lower()  # gRPC metadata keys are lower-case


class _Call:
    """One RPC: maps a ServiceError to its status code (once, for every method), counts and times it."""

    def __init__(self, service: Service, method: str, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method, self.context = service, method, context
        self.policy_version = ""

    def metadata(self, key: str) -> str | None:
        return dict(self.context.invocation_metadata() or ()).get(key)

    def trace(self) -> dict[str, str] | None:
        return trace_context(dict(self.context.invocation_metadata() or ()))

    def principal(self) -> str:
        return self.service.keys.principal_for(self.metadata("authorization"))

    def admin(self) -> str:
        return admin_principal(self.service.admin_keys, self.service.keys, self.metadata("authorization"))

    async def __aenter__(self) -> _Call:
        self.started = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, ServiceError):
                code = status_code(exc)
                await self.context.abort(code, exc.message)
            elif isinstance(exc, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif isinstance(exc, Exception):
                code = grpc.StatusCode.INTERNAL
                log.error("unexpected error in %s", self.method, exc_info=exc)
                await self.context.abort(code, "the server had an error while processing your request")
        finally:
            labels = ("grpc", self.method, code.name, self.policy_version)
            self.service.metrics.requests.labels(*labels).inc()
            self.service.metrics.request_duration.labels(*labels).observe(time.perf_counter() - self.started)


def to_request(request: completions_pb2.CompleteRequest) -> GenerationRequest:
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("give a prompt or chat messages", param="prompt")
    common: dict[str, Any] = {
        "model": request.model,
        "n": request.n if request.HasField("n") else 1,
        "max_tokens": request.max_tokens if request.HasField("max_tokens") else None,
        "temperature": request.temperature if request.HasField("temperature") else 1.0,
        "top_p": request.top_p if request.HasField("top_p") else 1.0,
        "stop": list(request.stop),
        "seed": request.seed if request.HasField("seed") else None,
        "logprobs": request.logprobs if request.HasField("logprobs") else None,
        "user": request.user or None,
        "presence_penalty": request.presence_penalty if request.HasField("presence_penalty") else 0.0,
        "frequency_penalty": request.frequency_penalty if request.HasField("frequency_penalty") else 0.0,
        "top_k": request.top_k if request.HasField("top_k") else 0,
        "min_p": request.min_p if request.HasField("min_p") else 0.0,
        "repetition_penalty": request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
        "min_tokens": request.min_tokens if request.HasField("min_tokens") else 0,
        "logit_bias": dict(request.logit_bias),
        "stop_token_ids": list(request.stop_token_ids),
        "ignore_eos": request.ignore_eos,
        "response_format": _response_format(request.response_format) if request.HasField("response_format") else None,
        "prompt_logprobs": request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
    }
    if which == "prompt":
        return GenerationRequest(endpoint="completions", prompt=request.prompt, **common)
    if which == "prompt_token_ids":
        return GenerationRequest(endpoint="completions", prompt=list(request.prompt_token_ids.ids), **common)
    messages = [_message(m) for m in request.chat.messages]
    tools = [_tool(t) for t in request.tools] or None
    choice = _tool_choice(request.tool_choice) if request.HasField("tool_choice") else ("auto" if tools else None)
    return GenerationRequest(
        endpoint="chat.completions",
        messages=messages,
        tools=None if choice == "none" else tools,
        tool_choice=None if choice == "none" else choice,
        parallel_tool_calls=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None,
        **common,
    )


def _message(m: completions_pb2.ChatMessage) -> dict[str, Any]:
    """A chat message as the HTTP API passes it on (tool calls in OpenAI's shape)."""
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def _tool(tool: completions_pb2.Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters:
        try:
            function["parameters"] = strict_json(tool.parameters)
        except ValueError:
            raise InvalidRequest(f"tool {tool.name!r}: parameters must be JSON text", param="tools") from None
        if not isinstance(function["parameters"], dict):
            raise InvalidRequest(f"tool {tool.name!r}: parameters must be a JSON Schema object", param="tools")
    return {"type": "function", "function": function}


def _tool_choice(given: completions_pb2.ToolChoice) -> str | dict[str, Any] | None:
    which = given.WhichOneof("choice")
    if which == "function":
        return {"type": "function", "function": {"name": given.function}}
    if which == "mode" and given.mode in ("none", "auto", "required"):
        return given.mode
    raise InvalidRequest("tool_choice is a mode (none, auto, required) or a function's name", param="tool_choice")


def _response_format(given: completions_pb2.ResponseFormat) -> dict[str, Any] | None:
    if given.type in ("", "text"):
        return None
    if given.type != "json_schema":
        return {"type": given.type}  # json_object, or a wrong type that validate() names
    try:
        schema = strict_json(given.json_schema)
    except ValueError:
        raise InvalidRequest("response_format.json_schema must be JSON text", param="response_format") from None
    return {"type": "json_schema", "name": "grpc", "schema": schema}


def _logprobs(items: list[TokenLogprob] | None) -> list[completions_pb2.TokenLogprob]:
    return [
        completions_pb2.TokenLogprob(
            token=i.token,
            logprob=i.logprob,
            top_logprobs=[completions_pb2.TopLogprob(token=t, logprob=lp) for t, lp in i.top],
        )
        for i in items or []
    ]


def _choice(c: ChoiceResult | ChoiceDelta) -> completions_pb2.Choice:
    # A result's calls are whole; a delta's carry their index and may be pieces of a call.
    if isinstance(c, ChoiceResult):
        calls = [{"index": i, **t} for i, t in enumerate(c.tool_calls or [])]
        text = (c.content or "") if c.tool_calls else c.text
    else:
        calls, text = c.tool_calls or [], c.text
    return completions_pb2.Choice(
        index=c.index,
        text=text,
        finish_reason=c.finish_reason or "",
        logprobs=_logprobs(c.logprobs),
        tool_calls=[
            completions_pb2.ToolCall(
                index=t["index"],
                id=t.get("id", ""),
                name=t.get("function", {}).get("name", ""),
                arguments=t.get("function", {}).get("arguments", ""),
            )
            for t in calls
        ],
    )


def _prompt_logprobs(result: CompletionResult) -> list[completions_pb2.PromptTokenLogprobs]:
    return [
        completions_pb2.PromptTokenLogprobs(
            entries=[
                completions_pb2.PromptLogprob(
                    token_id=int(token_id), logprob=e["logprob"], rank=e["rank"] or 0, decoded_token=e["decoded_token"]
                )
                for token_id, e in (position or {}).items()
            ]
        )
        for position in result.prompt_logprobs or []
    ]


def _usage(result: CompletionResult) -> completions_pb2.Usage:
    return completions_pb2.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


class CompletionsServicer(completions_pb2_grpc.CompletionsServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def Complete(self, request: Any, context: Any) -> Any:  # noqa: N802
        async with _Call(self.service, "heed.v1.Completions/Complete", context) as call:
            generation = to_request(request)
            generation.trace = call.trace()
            prepared = await self.service.completions.prepare(generation, call.principal(), call.metadata(PIN_METADATA))
            call.policy_version = prepared.policy_version
            result = await self.service.completions.complete(prepared)
            return completions_pb2.CompleteResponse(
                id=result.completion_id,
                model=result.policy_version,
                created=result.created,
                choices=[_choice(c) for c in result.choices],
                usage=_usage(result),
                prompt_logprobs=_prompt_logprobs(result),
            )

    async def StreamComplete(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async with _Call(self.service, "heed.v1.Completions/StreamComplete", context) as call:
            generation = to_request(request)
            generation.stream = True
            generation.trace = call.trace()
            prepared = await self.service.completions.prepare(generation, call.principal(), call.metadata(PIN_METADATA))
            call.policy_version = prepared.policy_version
            base: dict[str, Any] = {
                "id": prepared.completion_id,
                "model": call.policy_version,
                "created": prepared.created,
            }
            async for event in self.service.completions.stream(prepared):
                if isinstance(event, CompletionResult):
                    yield completions_pb2.CompleteChunk(**base, usage=_usage(event))
                else:
                    yield completions_pb2.CompleteChunk(**base, choices=[_choice(d) for d in event])


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def Submit(self, request: Any, context: Any) -> Any:  # noqa: N802
        async with _Call(self.service, "heed.v1.Feedback/Submit", context) as call:
            return await self._submit(request, call)

    async def _submit(self, request: Any, call: _Call) -> Any:
        signal = request.WhichOneof("signal")
        feedback = FeedbackInput(
            completion_id=request.completion_id,
            choice_index=request.choice_index if request.HasField("choice_index") else None,
            thumb=request.thumb if signal == "thumb" else None,
            rating=request.rating if signal == "rating" else None,
            ranking=list(request.ranking.choice_indices) if signal == "ranking" else None,
            ranks=list(request.ranking.ranks) if signal == "ranking" and request.ranking.ranks else None,
            correction=request.correction if signal == "correction" else None,
            comment=request.comment or None,
            flags=list(request.flags),
            idempotency_key=request.idempotency_key or None,
            key=request.score.key if signal == "score" else None,
            score=_score_value(request.score) if signal == "score" else None,
            metadata=json_format.MessageToDict(request.metadata) if request.HasField("metadata") else None,
            source=request.source or None,
            trace=call.trace(),
        )
        record, replayed = await self.service.feedback.submit(feedback, call.principal())
        call.policy_version = record.policy_version
        return feedback_pb2.FeedbackReceipt(
            id=record.feedback_id,
            completion_id=record.completion_id,
            kind=record.kind,
            created=int(record.created),
            replayed=replayed,
        )


def _score_value(score: Any) -> float | bool | str | None:
    """A Score's value as POST /v1/feedback takes it (None: no value set)."""
    which = score.WhichOneof("value")
    return None if which is None else getattr(score, which)


def _rollout_status(status: RolloutStatus) -> rollout_pb2.RolloutStatus:
    state = status.state
    return rollout_pb2.RolloutStatus(
        stable=state.stable or "",
        canary=state.canary or "",
        canary_share=state.canary_share,
        step=state.step,
        paused=state.paused,
        mode=state.mode,
        slots=[
            rollout_pb2.SlotStatus(name=s.name, policy_version=s.policy_version, ready=s.ready, swapping=s.swapping)
            for s in status.slots
        ],
        history=[
            rollout_pb2.Decision(
                time=d.time,
                action=d.action,
                version=d.version or "",
                by=d.by,
                reason=d.reason,
                share=d.share,
                evidence_json=json.dumps(d.evidence),
            )
            for d in state.history
        ],
        evidence_json=json.dumps(status.evidence),
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServicer):
    """The admin API: the same rollout core as /admin/rollout, under an admin key."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def _act(self, context: Any, method: str, action: AdminAction | None, version: str | None = None) -> Any:
        async with _Call(self.service, f"heed.v1.Rollout/{method}", context) as call:
            by = call.admin()
            rollout = self.service.rollout
            return _rollout_status(rollout.status() if action is None else await rollout.act(action, by, version))

    async def GetStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._act(context, "GetStatus", None)

    async def StartCanary(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._act(context, "StartCanary", "canary", request.version)

    async def Promote(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._act(context, "Promote", "promote")

    async def Rollback(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._act(context, "Rollback", "rollback")

    async def Pause(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._act(context, "Pause", "pause")

    async def Resume(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._act(context, "Resume", "resume")

    async def ListVersions(self, request: Any, context: Any) -> Any:  # noqa: N802
        async with _Call(self.service, "heed.v1.Rollout/ListVersions", context) as call:
            call.admin()
            versions = await asyncio.to_thread(self.service.registry.versions)
            return rollout_pb2.ListVersionsResponse(
                versions=[
                    rollout_pb2.PolicyVersion(
                        version=m.version,
                        sequence=m.sequence,
                        parent=m.parent or "",
                        created=m.created,
                        watermark=m.watermark,
                        source=m.source,
                        data_json=json.dumps(m.data),
                        evaluation_json=json.dumps(m.evaluation),
                        mode=m.mode,
                        base=m.base or "",
                    )
                    for m in versions
                ]
            )


async def start_grpc(service: Service, host: str, port: int) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """Start the gRPC server; health reports NOT_SERVING until `mark_serving`."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", service.config.max_body_bytes)],
        maximum_concurrent_rpcs=service.config.max_connections,  # more: RESOURCE_EXHAUSTED at once
    )
    completions_pb2_grpc.add_CompletionsServicer_to_server(CompletionsServicer(service), server)
    feedback_pb2_grpc.add_FeedbackServicer_to_server(FeedbackServicer(service), server)
    rollout_pb2_grpc.add_RolloutServicer_to_server(RolloutServicer(service), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health


async def set_health(health: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICE_NAMES):
        await health.set(name, status)


async def follow_health(service: Service, health: health_aio.HealthServicer, stop: asyncio.Event) -> None:
    """gRPC health says what /ready says (SERVING only while ready), checked every second."""
    serving: bool | None = None
    while not stop.is_set():
        ready = (await service_health(service.slots, service.writer)).ready
        if ready != serving:
            await set_health(health, ready)
            serving = ready
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
