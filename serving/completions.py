"""The completion service core: one request in, choices out, every completion logged durably.

HTTP and gRPC both call `prepare` (which raises every caller error before any byte is sent),
then `complete` or `stream`. A completion is committed to the event log before the caller sees
its end (the response, or the last chunk of a stream), so feedback can always find it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from heed.eventlog import ChoiceRecord, CompletionRecord
from heed.prompts import NoChatTemplate, encode_chat, encode_raw
from serving.engine import EngineSlot, Lease
from serving.errors import InvalidRequest, PermissionDenied, ServiceError, Unavailable
from serving.event_writer import EventWriter
from serving.metrics import ServiceMetrics
from serving.requests import (
    ChoiceDelta,
    ChoiceResult,
    CompletionResult,
    GenerationRequest,
    TokenLogprob,
    check_in_vocabulary,
    check_token_ids,
    parse_tool_calls,
    validate,
)
from serving.router import Router
from serving.tool_parsing import AutoToolCalls, ForcedCallStream, parses
from serving.tracing import CompletionSpans, Tracing

log = logging.getLogger(__name__)
INLINE_TOKENIZE_CHARS = 8192  # longer prompts are tokenized on a thread (a thread hop costs ~0.1 ms)


def _text_size(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(m.get("content", "")) for m in request.messages)
    return len(request.prompt) if isinstance(request.prompt, str) else 0


# OpenAI's default for the legacy completions endpoint; chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class PreparedCompletion:
    request: GenerationRequest
    principal: str
    completion_id: str
    created: int
    started: float
    slot: EngineSlot
    lease: Lease  # pins the policy version until the completion is logged
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: Any  # vllm.SamplingParams
    spans: CompletionSpans  # its OpenTelemetry spans (no-ops without an OTLP endpoint)
    caller: str | None = None  # the caller it counts under, when not its `user` (CompletionRecord.caller)
    auto_tools: AutoToolCalls | None = None  # tool_choice "auto" with a --tool-call-parser
    forced_calls: ForcedCallStream | None = None  # a streamed answer held to forced calls' JSON

    @property
    def policy_version(self) -> str:
        return self.lease.policy_version


class CompletionService:
    def __init__(
        self,
        router: Router,
        writer: EventWriter,
        metrics: ServiceMetrics,
        *,
        max_n: int,
        may_pin: Callable[[str], bool] = lambda principal: True,
        may_name_users: Callable[[str], bool] = lambda principal: True,
        max_in_flight: int = 1 << 30,
        tracing: Tracing | None = None,
        tool_parser: type | None = None,
    ) -> None:
        self.router = router
        self.tracing = tracing or Tracing()
        self.writer = writer
        self.metrics = metrics
        self.max_n = max_n
        self.may_pin = may_pin  # whether a principal may ask for a version, not the rollout's split
        # Whether the end users a principal names (``user``) are callers of their own: a key that
        # could make up users would be as many callers as it liked in the canary's and the
        # trainer's evidence, where no caller may carry more than its share.
        self.may_name_users = may_name_users
        self.max_in_flight = max_in_flight
        self.tool_parser = tool_parser  # vLLM's parser of the model's tool calls (--tool-call-parser)
        self._pending: set[asyncio.Future[Any]] = set()  # log writes of abandoned streams

    # ---- preparation ---------------------------------------------------------------------
    async def prepare(
        self,
        request: GenerationRequest,
        principal: str,
        pinned_version: str | None = None,
        completion_id: str | None = None,
    ) -> PreparedCompletion:
        """Validate, route to an engine slot, tokenize and lease the slot's version; raises
        ServiceError on any caller error. ``pinned_version``: answer with this served version;
        ``completion_id``: the id to log it under (default: a new one)."""
        started = time.monotonic()
        validate(request, max_n=self.max_n)
        vouched = request.user if request.user and self.may_name_users(principal) else None
        slot = self.router.route(request.model, vouched, principal, pinned_version)
        named = request.model not in ("", self.router.served_model_name)
        if (named or pinned_version) and not self.may_pin(principal):
            # A caller who could pick the canary could aim errors or thumbs at it: the rollout's
            # evidence comes from the split, and pinning is for the keys an operator names.
            raise PermissionDenied(
                f"this key may not ask for a specific policy version: send model "
                f"{self.router.served_model_name!r} (the operator can allow it with --pin-principals)",
                param="model" if named else None,
                code="pin_not_allowed",
            )
        if _text_size(request) > INLINE_TOKENIZE_CHARS:  # a long prompt would hold the event loop
            prompt_ids = await asyncio.to_thread(self._tokenize, slot, request)
        else:
            prompt_ids = self._tokenize(slot, request)
        limit = slot.settings.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)}.",
                param="messages" if request.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        if request.max_tokens is None:
            default = COMPLETIONS_DEFAULT_MAX_TOKENS if request.endpoint == "completions" else limit
            max_tokens = min(default, limit - len(prompt_ids))
        else:
            max_tokens = request.max_tokens
            if len(prompt_ids) + max_tokens > limit:
                raise InvalidRequest(
                    f"This model's maximum context length is {limit} tokens; you requested "
                    f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                    "completion). Reduce the prompt or max_tokens.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        if request.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
            )
        auto_tools = None
        if self.tool_parser is not None and parses(request):
            auto_tools = AutoToolCalls(self.tool_parser, slot.tokenizer, request)
        sampling = slot.sampling(request, max_tokens, auto_tools.skip_special_tokens if auto_tools else True)
        prefix = "chatcmpl-" if request.endpoint == "chat.completions" else "cmpl-"
        if self.router.slots.in_flight() >= self.max_in_flight:  # a bounded queue: shed load at once
            self.metrics.rejected.labels("overloaded").inc()
            raise Unavailable(
                f"the server has {self.max_in_flight} requests in flight, its limit; retry shortly", code="overloaded"
            )
        lease = await slot.lease()  # last: a caller error above holds nothing
        asked = request.model if named else pinned_version
        if asked and lease.policy_version != asked:  # a promote or rollback swapped it while we waited
            lease.release()
            raise Unavailable(
                f"{asked} stopped being served by the slot this request waited on (a promote or rollback); "
                "retry: it is answered by the slot that serves it now, or refused",
                code="version_changed",
            )
        completion_id = completion_id or prefix + uuid.uuid4().hex
        attributes = {
            "heed.completion_id": completion_id,
            "heed.policy_version": lease.policy_version,
            "heed.endpoint": request.endpoint,
        }
        return PreparedCompletion(
            request=request,
            principal=principal,
            completion_id=completion_id,
            created=int(time.time()),
            started=started,
            slot=slot,
            lease=lease,
            prompt_token_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            spans=self.tracing.completion(request.trace, "heed.completion", attributes),
            caller=principal if request.user and vouched is None else None,
            auto_tools=auto_tools,
            forced_calls=ForcedCallStream(request) if request.stream and request.forces_tool_calls() else None,
        )

    async def tokenize(self, request: GenerationRequest) -> tuple[list[int], int]:
        """The token ids a completion of ``request`` would start from, and the context length
        (/tokenize). Every version of a rollout shares the tokenizer, so the alias uses stable's."""
        validate(request, max_n=self.max_n)
        slot = self._tokenizer_slot(request.model)
        if len(request.prompt or "") > INLINE_TOKENIZE_CHARS or request.messages:
            ids = await asyncio.to_thread(self._tokenize, slot, request)
        else:
            ids = self._tokenize(slot, request)
        return ids, slot.settings.max_model_len

    def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of ``tokens`` (/detokenize)."""
        tokenizer = self._tokenizer_slot(model).tokenizer
        check_in_vocabulary("tokens", tokens, len(tokenizer))
        return str(tokenizer.decode(tokens))

    def _tokenizer_slot(self, model: str) -> EngineSlot:
        slots = self.router.slots
        slot = slots.stable if model == self.router.served_model_name else slots.for_version(model)
        if slot.tokenizer is None:
            raise Unavailable("the engine is still loading", code="loading")
        return slot

    def _tokenize(self, slot: EngineSlot, request: GenerationRequest) -> list[int]:
        tokenizer = slot.tokenizer
        if request.logit_bias or request.stop_token_ids or request.top_k > 0:
            check_token_ids(request, len(tokenizer))
        if request.messages is not None:  # heed.prompts: the one encoding the trainer shares
            try:
                return encode_chat(tokenizer, request.messages, request.tools)
            except NoChatTemplate:
                raise InvalidRequest(
                    "this model has no chat template; use /v1/completions", code="no_chat_template"
                ) from None
            except TemplateError as exc:  # a template that refuses a role or a shape (raise_exception)
                raise InvalidRequest(
                    f"the model's chat template refused these messages: {exc}", param="messages"
                ) from None
        if isinstance(request.prompt, list):
            check_in_vocabulary("prompt", request.prompt, len(tokenizer))
            return list(request.prompt)
        assert request.prompt is not None  # validate() refused a missing prompt
        return encode_raw(tokenizer, request.prompt)

    # ---- generation ----------------------------------------------------------------------
    async def complete(self, prepared: PreparedCompletion) -> CompletionResult:
        """Generate all choices, commit the completion to the event log, return it."""
        choices = [ChoiceResult(index=i) for i in range(prepared.request.n)]
        first_token_seen = False
        prompt_logprobs: Any = None
        try:
            async for output in self._generate(prepared):
                if not first_token_seen:
                    first_token_seen = True
                    self._observe_first_token(prepared)
                if prepared.request.prompt_logprobs is not None:
                    prompt_logprobs = output.prompt_logprobs or prompt_logprobs
                for out in output.outputs:
                    _accumulate(choices[out.index], out, prepared.slot.tokenizer, prepared.request.logprobs)
            result = await self._finish(prepared, choices)
            if prepared.request.prompt_logprobs is not None:
                result.prompt_logprobs = _prompt_logprobs(prompt_logprobs, prepared.slot.tokenizer)
            return result
        finally:
            prepared.lease.release()

    async def _generate(self, prepared: PreparedCompletion) -> AsyncIterator[Any]:
        """The engine's outputs; a server-side failure is counted against the version."""
        spans = prepared.spans
        try:
            async for output in prepared.slot.generate(
                prepared.lease,
                prepared.prompt_token_ids,
                prepared.sampling,
                prepared.completion_id,
                spans.engine_headers(),
            ):
                spans.output()
                yield output
        except BaseException as exc:
            spans.failed(exc)
            if isinstance(exc, InvalidRequest) and exc.param is None and prepared.request.grammar_field():
                # the engine refused the request's grammar as it took it: name the field it came from
                raise InvalidRequest(exc.message, param=prepared.request.grammar_field()) from None
            if not isinstance(exc, ServiceError | asyncio.CancelledError | GeneratorExit):
                self.router.observe(prepared.policy_version, time.monotonic() - prepared.started, error=True)
            raise

    async def stream(self, prepared: PreparedCompletion) -> AsyncIterator[list[ChoiceDelta] | CompletionResult]:
        """Yield lists of deltas as tokens arrive, then the logged CompletionResult."""
        choices = [ChoiceResult(index=i) for i in range(prepared.request.n)]
        first_token_seen = False
        write: asyncio.Future[CompletionResult] | None = None
        # Tool calls go out piece by piece: forced ones as their JSON grows, the ones the model
        # chose to make (tool_choice "auto") as its parser reads them.
        forced, auto = prepared.forced_calls, prepared.auto_tools
        try:
            async for output in self._generate(prepared):
                if not first_token_seen and any(o.token_ids for o in output.outputs):
                    first_token_seen = True
                    self._observe_first_token(prepared)
                deltas = []
                for out in output.outputs:
                    choice = choices[out.index]
                    previous_text, previous_ids = choice.text, len(choice.token_ids)
                    delta_logprobs = _accumulate(choice, out, prepared.slot.tokenizer, prepared.request.logprobs)
                    text, tool_calls, reason = out.text, None, out.finish_reason
                    if forced is not None:
                        text, tool_calls = "", forced.feed(out.index, choice.text)
                        if reason == "stop" and _calls_finish(prepared.request, choice.text):
                            reason = "tool_calls"  # as _finish records it
                    elif auto is not None:
                        text, tool_calls = auto.stream(
                            out.index,
                            previous_text,
                            choice.text,
                            choice.token_ids[:previous_ids],
                            choice.token_ids,
                            finished=reason is not None,
                        )
                        if reason == "stop" and auto.called(out.index):
                            reason = "tool_calls"  # as _finish records it
                    if text or tool_calls or reason or delta_logprobs:
                        deltas.append(ChoiceDelta(out.index, text, delta_logprobs, reason, tool_calls or None))
                if deltas:
                    yield deltas
            # The log write runs on: a caller who goes away while it commits (a disconnect, a
            # cancelled RPC) cancels only the wait for it, and the completion is logged once.
            write = asyncio.ensure_future(self._finish(prepared, choices))
            try:
                result = await asyncio.shield(write)
            except asyncio.CancelledError:
                self._adopt(write)
                raise
            yield result
        finally:
            prepared.lease.release()
            if write is None:  # the caller went away before the end: still log what was generated
                for choice in choices:
                    choice.finish_reason = choice.finish_reason or "abort"
                self._adopt(asyncio.get_running_loop().create_task(self._finish(prepared, choices)))

    def _adopt(self, task: asyncio.Task[Any] | asyncio.Future[Any]) -> None:
        """Keep a log write nobody awaits any more until it ends (``_pending``); say if it failed."""
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any] | asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:  # counted by the writer; said once here
            log.warning("an abandoned stream could not be logged: %s", task.exception())

    def _observe_first_token(self, prepared: PreparedCompletion) -> None:
        self.metrics.time_to_first_token.labels(prepared.policy_version).observe(time.monotonic() - prepared.started)

    async def _finish(self, prepared: PreparedCompletion, choices: list[ChoiceResult]) -> CompletionResult:
        r = prepared.request
        _take_tool_calls(r, choices, prepared.auto_tools, prepared.forced_calls)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        record = CompletionRecord(
            completion_id=prepared.completion_id,
            created=time.time(),
            principal=prepared.principal,
            policy_version=prepared.policy_version,
            endpoint=r.endpoint,
            prompt=r.prompt if isinstance(r.prompt, str) else None,
            messages=tuple(r.messages) if r.messages is not None else None,
            prompt_token_ids=tuple(prepared.prompt_token_ids),
            params={**r.sampling_record(), "max_tokens": prepared.max_tokens},
            choices=tuple(
                ChoiceRecord(
                    c.index, c.text, tuple(c.token_ids), c.finish_reason, tuple(c.tool_calls) if c.tool_calls else None
                )
                for c in choices
            ),
            prompt_tokens=len(prepared.prompt_token_ids),
            completion_tokens=completion_tokens,
            latency_s=time.monotonic() - prepared.started,
            user=r.user,
            trace=r.trace,
            caller=prepared.caller,
        )
        write_started = time.time_ns()
        try:
            await self.writer.append_completion(record)
        except Exception as exc:
            prepared.spans.failed(exc)
            raise
        prepared.spans.logged(write_started, {"heed.completion_tokens": completion_tokens})
        self.router.observe(prepared.policy_version, record.latency_s, error=False)
        self.metrics.generated_tokens.labels(prepared.policy_version).inc(completion_tokens)
        self.metrics.prompt_tokens.labels(prepared.policy_version).inc(len(prepared.prompt_token_ids))
        return CompletionResult(
            completion_id=prepared.completion_id,
            created=prepared.created,
            policy_version=prepared.policy_version,
            choices=choices,
            prompt_tokens=len(prepared.prompt_token_ids),
            completion_tokens=completion_tokens,
        )


def _prompt_logprobs(entries: Any, tokenizer: Any) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt logprobs (per prompt token: None, or token id -> Logprob) in the shape its
    OpenAI server returns them."""

    def text(token_id: int, entry: Any) -> str:
        return entry.decoded_token if entry.decoded_token is not None else tokenizer.decode([token_id])

    return [
        None
        if position is None
        else {
            str(token_id): {
                "logprob": _finite(entry.logprob),
                "rank": entry.rank,
                "decoded_token": text(token_id, entry),
            }
            for token_id, entry in position.items()
        }
        for position in entries or []
    ]


def _take_tool_calls(
    request: GenerationRequest,
    choices: list[ChoiceResult],
    auto: AutoToolCalls | None,
    forced: ForcedCallStream | None,
) -> None:
    """Parse the tool calls of an answer, as vLLM's server does: calls the model chose to make
    (tool_choice "auto", read by the --tool-call-parser) and a "required" answer's finish with
    reason tool_calls, a named function's keep their own reason."""
    if auto is not None:
        for choice in choices:
            choice.content, choice.tool_calls = auto.parse(choice.index, choice.text)
            if choice.tool_calls and choice.finish_reason == "stop":
                choice.finish_reason = "tool_calls"
        return
    if not request.forces_tool_calls():
        return
    for choice in choices:
        choice.tool_calls = parse_tool_calls(request, choice.text)
        if forced is not None:  # the ids and argument texts the client was sent
            choice.tool_calls = forced.streamed(choice.index, choice.tool_calls)
        if choice.tool_calls and request.tool_choice == "required" and choice.finish_reason == "stop":
            choice.finish_reason = "tool_calls"


def _calls_finish(request: GenerationRequest, text: str) -> bool:
    """Whether a forced answer that stopped finishes with reason tool_calls, as vLLM's: a
    "required" one that holds calls (a named function's keeps "stop")."""
    return request.tool_choice == "required" and parse_tool_calls(request, text) is not None


def _accumulate(choice: ChoiceResult, out: Any, tokenizer: Any, logprobs: int | None) -> list[TokenLogprob] | None:
    """Add a (delta or final) vLLM CompletionOutput to the choice; returns the new logprobs."""
    choice.text += out.text
    choice.token_ids.extend(out.token_ids)
    if out.finish_reason is not None:
        choice.finish_reason = out.finish_reason
    if logprobs is None or not out.logprobs:
        return None
    new = [
        _token_logprob(token_id, entries, tokenizer, logprobs)
        for token_id, entries in zip(out.token_ids, out.logprobs, strict=False)
    ]
    choice.logprobs = (choice.logprobs or []) + new
    return new


def _token_logprob(token_id: int, entries: dict[int, Any], tokenizer: Any, k: int) -> TokenLogprob:
    def text(tid: int) -> str:
        decoded = entries[tid].decoded_token
        return decoded if decoded is not None else tokenizer.decode([tid])

    ranked = sorted((e.rank, tid) for tid, e in entries.items() if e.rank is not None)
    top = tuple((text(tid), _finite(entries[tid].logprob)) for _, tid in ranked[:k])
    return TokenLogprob(token=text(token_id), logprob=_finite(entries[token_id].logprob), top=top)


def _finite(logprob: float) -> float:
    """A logprob as JSON can carry it: a token a grammar (response_format, a forced tool call)
    masks out has -inf, which vLLM's server sends as -9999.0; so does heed."""
    return max(float(logprob), -9999.0)
