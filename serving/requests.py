"""What a completion request and its result are, independent of HTTP or gRPC, and their checks.

Both surfaces translate their wire format into a GenerationRequest; every range check lives here
so the two APIs reject the same inputs with the same messages.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.errors import InvalidRequest

Endpoint = Literal["completions", "chat.completions"]
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
MAX_STOP_SEQUENCES = 4
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024  # token ids with a bias, per request
MAX_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**63 - 1)  # what the engine's request encoder takes (as vLLM's own server)


@dataclass
class GenerationRequest:
    endpoint: Endpoint
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # top alternatives per token; None: no logprobs at all
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs with this many alternatives; None: none
    user: str | None = None
    stream: bool = False
    echo: bool = False
    # vLLM's own sampling fields (its OpenAI server takes them too)
    top_k: int = 0  # 0 or -1: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias added to its logit
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # OpenAI's response_format, as vLLM's structured outputs take it: {"type": "json_object"} or
    # {"type": "json_schema", "name": ..., "schema": {...}}; None: free text
    response_format: dict[str, Any] | None = None
    # The caller's trace context and request id (``trace_context``): logged, not a sampling field.
    trace: dict[str, str] | None = None
    # Function calling (chat): OpenAI's tools ({"type": "function", "function": {name,
    # description, parameters}}) and tool_choice ("none", "auto", "required" or {"type":
    # "function", "function": {"name": ...}}); None: no tools.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def forced_tool(self) -> str | None:
        """The function a named tool_choice forces, if any."""
        if isinstance(self.tool_choice, dict):
            return str(self.tool_choice["function"]["name"])
        return None

    def forces_tool_calls(self) -> bool:
        """Whether the answer must be tool calls (a named tool_choice, or "required"): vLLM's
        structured outputs then hold the answer to the calls' JSON, whatever the model."""
        return bool(self.tools) and (self.tool_choice == "required" or self.forced_tool() is not None)

    def grammar_field(self) -> str | None:
        """The field whose grammar holds the answer (vLLM's structured outputs), if any."""
        if self.forces_tool_calls():
            return "tools"
        return "response_format" if self.response_format else None

    def tool_calls_schema(self) -> dict[str, Any]:
        """The JSON Schema a forced answer matches, as vLLM's server builds it: a named function's
        parameters, or (required) a list of at least one {"name", "parameters"} of the tools."""
        functions = {t["function"]["name"]: t["function"].get("parameters") for t in self.tools or []}
        named = self.forced_tool()
        if named is not None:
            return functions[named] or {"type": "object", "properties": {}}
        schema: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "anyOf": [
                    {
                        "properties": {
                            "name": {"type": "string", "enum": [name]},
                            "parameters": params or {"type": "object", "properties": {}},
                        },
                        "required": ["name", "parameters"],
                    }
                    for name, params in functions.items()
                ],
            },
        }
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema

    def sampling_record(self) -> dict[str, Any]:
        """The sampling fields as the event log keeps them (``CompletionRecord.params``)."""
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "logit_bias": {str(token): bias for token, bias in self.logit_bias.items()},
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "response_format": self.response_format,
            **({"tools": self.tools, "tool_choice": self.tool_choice} if self.tools else {}),
            "seed": self.seed,
            "logprobs": self.logprobs,
            **({"prompt_logprobs": self.prompt_logprobs} if self.prompt_logprobs is not None else {}),
            "stream": self.stream,
        }


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    # OpenAI's tool calls ({"id", "type": "function", "function": {"name", "arguments"}}) parsed
    # from the answer (forced, or read by the tool parser); None if it made none. With calls,
    # ``content`` is the text besides them (None if there is none); ``text`` stays what the model wrote.
    tool_calls: list[dict[str, Any]] | None = None
    content: str | None = None


@dataclass
class ChoiceDelta:
    """New text of one choice since the last delta (streaming). ``tool_calls``: OpenAI's streamed
    tool-call deltas, each with its call's ``index`` (a whole call, or its id and name first and
    then pieces of its arguments)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class CompletionResult:
    completion_id: str
    created: int
    policy_version: str
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    # With prompt_logprobs, vLLM's shape: per prompt token (the first has none) a dict of token
    # id (as text) -> {"logprob", "rank", "decoded_token"}: the token itself and the top alternatives.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


def parse_tool_calls(request: GenerationRequest, text: str) -> list[dict[str, Any]] | None:
    """The tool calls of an answer to a request that forces them (its text is the calls' JSON,
    held to ``tool_calls_schema``): a named function's arguments, or the "required" list of
    {"name", "parameters"}. None when the text is no complete call (cut at max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    named = request.forced_tool()
    if named is not None:
        calls = [(named, value)]
    elif isinstance(value, list) and all(isinstance(c, dict) and "name" in c for c in value):
        calls = [(str(c["name"]), c.get("parameters", {})) for c in value]
    else:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
        for name, arguments in calls
    ]


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    if too_low or value > high or not math.isfinite(value):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise InvalidRequest(f"{name} must be {bound} and at most {high}; got {value}", param=name)


def check_text(name: str, value: str | None) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate): no tokenizer or log takes it."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{name} holds an unpaired surrogate ({value[exc.start : exc.end]!a}) at character {exc.start}; "
            "strings must be valid Unicode",
            param=name,
        ) from None


# W3C Trace Context: version 00's traceparent; a header that does not parse is ignored, as the
# recommendation asks of a receiver (it starts a new trace instead).
TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_TRACESTATE_CHARS = 512
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a double's range")
    return value


def strict_json(text: str) -> Any:
    """``json.loads`` as the API takes JSON: no NaN or Infinity (Python's extension) and no
    number beyond a double (1e999), which no log, database or engine takes back. Raises
    ValueError, also for a document nested too deeply."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def trace_context(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The request's ``traceparent`` (and its ``tracestate``) and ``x-request-id``, where well
    formed, from HTTP headers or gRPC metadata (lower-case names); None without any. Ill-formed
    values are dropped, not refused: tracing never fails a request."""
    found: dict[str, str] = {}
    parent = headers.get("traceparent", "").strip().lower()
    if TRACEPARENT.match(parent):
        found["traceparent"] = parent
        state = headers.get("tracestate", "").strip()
        if state and len(state) <= MAX_TRACESTATE_CHARS and state.isprintable():
            found["tracestate"] = state
    request_id = headers.get("x-request-id", "").strip()
    if REQUEST_ID.match(request_id):
        found["request_id"] = request_id
    return found or None


def check_key_text(name: str, value: str | None) -> None:
    """Refuse a NUL character in a string the event log keeps as a key of its own (a column, not
    only inside the record's JSON): PostgreSQL's text cannot hold one."""
    check_text(name, value)
    if value is not None and "\x00" in value:
        raise InvalidRequest(f"{name} holds a NUL character at {value.index(chr(0))}", param=name)


def validate(request: GenerationRequest, *, max_n: int) -> None:
    """Reject out-of-range or inconsistent parameters (types are the surface's job): everything
    the engine would refuse is refused here, as the caller's error, before it reaches the engine."""
    check_text("model", request.model)
    check_key_text("user", request.user)
    if isinstance(request.prompt, str):
        check_text("prompt", request.prompt)
    for i, stop in enumerate(request.stop):
        check_text(f"stop[{i}]", stop)
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise InvalidRequest(
            f"seed must be at least {SEED_RANGE[0]} and at most {SEED_RANGE[1]}; got {request.seed}", param="seed"
        )
    _check_range("temperature", request.temperature, 0.0, 2.0)
    _check_range("top_p", request.top_p, 0.0, 1.0, low_open=True)
    _check_range("presence_penalty", request.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", request.frequency_penalty, -2.0, 2.0)
    _check_range("n", request.n, 1, max_n)
    if request.n > 1 and request.temperature == 0:
        raise InvalidRequest("n must be 1 when temperature is 0 (greedy choices would all be equal)", param="n")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1; got {request.max_tokens}", param="max_tokens")
    if request.logprobs is not None:
        _check_range("logprobs", request.logprobs, 0, MAX_LOGPROBS)
    if request.prompt_logprobs is not None:
        _check_range("prompt_logprobs", request.prompt_logprobs, 0, MAX_LOGPROBS)
        if request.stream:
            raise InvalidRequest("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
    if request.top_k < -1:
        raise InvalidRequest(f"top_k must be -1 or 0 (every token) or a count; got {request.top_k}", param="top_k")
    _check_range("min_p", request.min_p, 0.0, 1.0)
    _check_range("repetition_penalty", request.repetition_penalty, 0.0, 2.0, low_open=True)
    if request.min_tokens < 0:
        raise InvalidRequest(f"min_tokens must be at least 0; got {request.min_tokens}", param="min_tokens")
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    for token, bias in request.logit_bias.items():
        _check_range(f"logit_bias[{token}]", bias, -100.0, 100.0)
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed", param="stop_token_ids")
    if request.response_format is not None:
        _check_response_format(request.response_format)
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    if any(s == "" for s in request.stop):
        raise InvalidRequest("stop sequences must not be empty", param="stop")
    if request.endpoint == "chat.completions":
        _validate_messages(request.messages)
        _validate_tools(request)
    elif request.tools or request.tool_choice is not None:
        raise InvalidRequest("tools belong to a chat", param="tools")
    elif request.prompt is None or request.prompt == "" or request.prompt == []:
        raise InvalidRequest("prompt must not be empty", param="prompt")


def _check_response_format(response_format: dict[str, Any]) -> None:
    kind = response_format.get("type")
    if kind == "json_object":
        return
    if kind != "json_schema":
        raise InvalidRequest(
            f"response_format.type must be text, json_object or json_schema; got {kind!r}", param="response_format"
        )
    schema = response_format.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON Schema (an object)",
            param="response_format.json_schema.schema",
        )


def check_in_vocabulary(name: str, ids: list[int], vocab: int) -> None:
    """Refuse token ids outside the served model's vocabulary (the engine would fail on them)."""
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise InvalidRequest(f"{name} holds token ids outside [0, {vocab}): {outside[:5]}", param=name)


def check_token_ids(request: GenerationRequest, vocab: int) -> None:
    """The request's sampling fields that name token ids, against the vocabulary."""
    check_in_vocabulary("logit_bias", list(request.logit_bias), vocab)
    check_in_vocabulary("stop_token_ids", request.stop_token_ids, vocab)
    if request.top_k > vocab:
        raise InvalidRequest(f"top_k must be at most the vocabulary's size {vocab}; got {request.top_k}", param="top_k")


def _validate_tools(request: GenerationRequest) -> None:
    tools, choice = request.tools or [], request.tool_choice
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if not TOOL_NAME.match(name):
            raise InvalidRequest(
                f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -; got {name!r}",
                param=f"tools[{i}].function.name",
            )
    if len(set(names)) != len(names):
        raise InvalidRequest("tools must have distinct function names", param="tools")
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters")
        if parameters is not None and parameters.get("type", "object") != "object":
            raise InvalidRequest(
                "a function's parameters are a JSON Schema of an object", param=f"tools[{i}].function.parameters"
            )
    if choice in ("required",) or isinstance(choice, dict):
        if not tools:
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        if request.response_format is not None:
            raise InvalidRequest("a forced tool call and a response_format cannot be combined", param="tool_choice")
    named = request.forced_tool()
    if named is not None and named not in names:
        raise InvalidRequest(f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")


def _validate_messages(messages: list[dict[str, Any]] | None) -> None:
    if not messages:
        raise InvalidRequest("messages must contain at least one message", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {role!r}", param=f"messages[{i}].role"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        check_text(f"messages[{i}].content", message["content"])
        check_text(f"messages[{i}].name", message.get("name"))
        if role == "tool" and not message.get("tool_call_id"):
            raise InvalidRequest(
                "a tool message answers a tool call: give its tool_call_id", param=f"messages[{i}].tool_call_id"
            )
        if message.get("tool_calls") and role != "assistant":
            raise InvalidRequest("only an assistant message has tool_calls", param=f"messages[{i}].tool_calls")
        for j, call in enumerate(message.get("tool_calls") or []):
            try:
                strict_json(call["function"]["arguments"])
            except ValueError:
                raise InvalidRequest(
                    "a tool call's arguments are JSON text", param=f"messages[{i}].tool_calls[{j}].function.arguments"
                ) from None
