"""The HTTP API's wire format: OpenAI-shaped request bodies (pydantic) and response bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from heed.eventlog import ScoreType
from serving.errors import InvalidRequest
from serving.feedback import (
    FLAG,
    MAX_CATEGORY_CHARS,
    MAX_COMMENT_CHARS,
    MAX_CORRECTION_CHARS,
    MAX_FLAGS,
    MAX_SOURCE_CHARS,
    SCORE_KEY,
    FeedbackInput,
)
from serving.requests import (
    CHAT_ROLES,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    SEED_RANGE,
    ChoiceDelta,
    CompletionResult,
    GenerationRequest,
    TokenLogprob,
)


def _doc(**keywords: Any) -> dict[str, Any]:
    """JSON Schema keywords for /openapi.json only: the bounds that serving/requests.py and
    serving/feedback.py check (one validator, for HTTP and gRPC alike), stated to clients. A
    keyword beside an anyOf applies to the instances of its type (minimum to numbers, maxItems to
    arrays), so it fits optional and union fields as they are."""
    return keywords


def _whole(value: Any) -> Any:
    """4.0 is the integer 4 (JSON and JSON Schema make no difference); 4.5, "4" and true stay errors."""
    return int(value) if type(value) is float and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole)]


class _Body(BaseModel):
    # strict: "1" is not 1 and true is not 1; forbid: an unsupported parameter is an error,
    # not silently ignored (as OpenAI: "Unrecognized request argument supplied").
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = Field(description="the schema's name", pattern="^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema the answer matches")
    strict: bool | None = Field(None, description="accepted; the answer always matches the schema")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")

    def to_request(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None:
            raise InvalidRequest("type json_schema needs its json_schema", param="response_format.json_schema")
        return {"type": "json_schema", "name": self.json_schema.name, "schema": self.json_schema.schema_}


class _Sampling(_Body):
    model: str = Field(description="a served policy version, or the service alias to let the router choose")
    n: Int = Field(
        1, description="how many choices to sample (at most the server's max n)", json_schema_extra=_doc(minimum=1)
    )
    max_tokens: Int | None = Field(
        None, description="the most tokens to generate per choice", json_schema_extra=_doc(minimum=1)
    )
    temperature: float | None = Field(
        None, description="0..2; 0 is greedy (default 1)", json_schema_extra=_doc(minimum=0, maximum=2)
    )
    top_p: float | None = Field(
        None,
        description="nucleus sampling mass, (0, 1] (default 1)",
        json_schema_extra=_doc(exclusiveMinimum=0, maximum=1),
    )
    presence_penalty: float | None = Field(None, description="-2..2", json_schema_extra=_doc(minimum=-2, maximum=2))
    frequency_penalty: float | None = Field(None, description="-2..2", json_schema_extra=_doc(minimum=-2, maximum=2))
    stop: str | list[str] | None = Field(
        None,
        description="up to 4 sequences where generation stops",
        json_schema_extra=_doc(minLength=1, maxItems=MAX_STOP_SEQUENCES, items={"type": "string", "minLength": 1}),
    )
    seed: Int | None = Field(
        None,
        description="sampling seed, for reproducible choices",
        json_schema_extra=_doc(minimum=SEED_RANGE[0], maximum=SEED_RANGE[1]),
    )
    user: str | None = Field(None, description="your end-user's id, stored with the completion")
    stream: bool = Field(False, description="send tokens as server-sent events as they are generated")
    stream_options: StreamOptions | None = None
    # vLLM's sampling fields, as its OpenAI server takes them
    top_k: Int | None = Field(
        None, description="sample from the k most likely tokens; -1 or 0: all", json_schema_extra=_doc(minimum=-1)
    )
    min_p: float | None = Field(
        None,
        description="drop tokens less likely than min_p times the most likely one, [0, 1] (default 0)",
        json_schema_extra=_doc(minimum=0, maximum=1),
    )
    repetition_penalty: float | None = Field(
        None,
        description="(0, 2]; above 1 discourages tokens already in the prompt or answer (default 1)",
        json_schema_extra=_doc(exclusiveMinimum=0, maximum=2),
    )
    min_tokens: Int | None = Field(
        None, description="at least this many tokens before a stop (default 0)", json_schema_extra=_doc(minimum=0)
    )
    logit_bias: dict[str, float] | None = Field(
        None,
        description="token id (as a string) -> bias in [-100, 100] added to its logit",
        json_schema_extra=_doc(
            maxProperties=MAX_LOGIT_BIAS,
            propertyNames={"pattern": "^[0-9]{1,10}$"},
            additionalProperties={"type": "number", "minimum": -100, "maximum": 100},
        ),
    )
    stop_token_ids: list[Int] | None = Field(
        None,
        description="token ids that end a choice",
        json_schema_extra=_doc(maxItems=MAX_STOP_TOKEN_IDS, items={"type": "integer", "minimum": 0}),
    )
    ignore_eos: bool | None = Field(None, description="keep generating past the end-of-sequence token (benchmarks)")
    response_format: ResponseFormat | None = Field(
        None, description="text (default), json_object, or json_schema: the answer matches the schema"
    )
    prompt_logprobs: Int | None = Field(
        None,
        description="the log-probability of each prompt token and of this many alternatives (0..20); not with stream",
        json_schema_extra=_doc(minimum=0, maximum=MAX_LOGPROBS),
    )

    def _common(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "seed": self.seed,
            "user": self.user,
            "stream": self.stream,
            "top_k": 0 if self.top_k is None else self.top_k,
            "min_p": self.min_p or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "min_tokens": self.min_tokens or 0,
            "logit_bias": _token_biases(self.logit_bias),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": bool(self.ignore_eos),
            "response_format": self.response_format.to_request() if self.response_format else None,
            "prompt_logprobs": self.prompt_logprobs,
        }


MAX_PROMPTS = 16  # prompts in one /v1/completions request


def _token_biases(biases: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (JSON keys are strings) with its keys as token ids."""
    out: dict[int, float] = {}
    for key, bias in (biases or {}).items():
        if not key.isascii() or not key.isdigit() or len(key) > 10:
            raise InvalidRequest(f"logit_bias keys must be token ids (digits); got {key!r}", param="logit_bias")
        out[int(key)] = bias
    return out


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="the prompt: a string or a list of token ids; or several of either (a list of them), each"
        " answered with n choices (choice i * n + j is prompt i's j-th)"
    )
    logprobs: Int | None = Field(
        None,
        description="return the log-probabilities of the top 0..20 tokens",
        json_schema_extra=_doc(minimum=0, maximum=MAX_LOGPROBS),
    )
    echo: bool = Field(False, description="not supported: false only", json_schema_extra=_doc(const=False))

    def to_requests(self) -> list[GenerationRequest]:
        """One request per prompt (a list of strings, or of token-id lists, is several prompts)."""
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        prompts: list[str | list[int]]
        if isinstance(self.prompt, list) and self.prompt and all(isinstance(p, str | list) for p in self.prompt):
            prompts = list(self.prompt)  # type: ignore[arg-type]  # strings, or token-id lists
        else:
            prompts = [self.prompt]  # type: ignore[list-item]  # a string, or one token-id list
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} prompts in one request", param="prompt")
        return [
            GenerationRequest(endpoint="completions", prompt=p, logprobs=self.logprobs, **self._common())
            for p in prompts
        ]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    role: str = Field(json_schema_extra=_doc(enum=list(CHAT_ROLES)))
    content: str | list[TextPart] | None = Field(description="null only in an assistant message with tool_calls")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls (a conversation sent back)")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


class FunctionDefinition(_Body):
    name: str = Field(json_schema_extra=_doc(pattern="^[A-Za-z0-9_-]{1,64}$"))
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments (an object)")
    strict: bool | None = Field(None, description="accepted; forced calls always match the parameters")


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(json_schema_extra=_doc(minItems=1))
    max_completion_tokens: Int | None = Field(
        None, description="alias of max_tokens", json_schema_extra=_doc(minimum=1)
    )
    logprobs: bool = Field(False, description="return the log-probability of each output token")
    top_logprobs: Int | None = Field(
        None,
        description="with logprobs: how many alternatives per token (0..20)",
        json_schema_extra=_doc(minimum=0, maximum=MAX_LOGPROBS),
    )
    tools: list[Tool] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="none; auto (the template sees the tools; with --tool-call-parser the calls the model writes"
        " are returned as tool_calls, else its answer is text); required or a named function: the answer is held"
        " to the calls' JSON and returned as tool_calls",
    )
    parallel_tool_calls: bool | None = Field(None, description="with required: false allows one call only")

    def to_request(self) -> GenerationRequest:
        common = self._common()
        if self.max_completion_tokens is not None:
            common["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        if tools is not None and choice is None:
            choice = "auto"  # OpenAI's default with tools
        return GenerationRequest(
            endpoint="chat.completions",
            messages=_plain_messages(self.messages),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            tools=None if choice == "none" else tools,
            tool_choice=None if choice == "none" else choice,
            parallel_tool_calls=self.parallel_tool_calls,
            **common,
        )


def _plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages with their text parts joined (no content: empty), as the chat template takes
    them, with an assistant's tool calls and a tool answer's call id where given."""
    plain: list[dict[str, Any]] = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise InvalidRequest("content may be null only in an assistant message with tool_calls", param="messages")
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        plain.append(message)
    return plain


class TokenizeBody(_Body):
    model: str = Field(description="a served policy version, or the service alias")
    prompt: str | None = Field(None, description="a completions prompt, tokenized as /v1/completions does")
    messages: list[ChatMessage] | None = Field(
        None, description="a chat, tokenized as /v1/chat/completions does", json_schema_extra=_doc(minItems=1)
    )

    def to_request(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give either prompt or messages", param="prompt")
        if self.messages is not None:
            return GenerationRequest(
                endpoint="chat.completions", model=self.model, messages=_plain_messages(self.messages)
            )
        return GenerationRequest(endpoint="completions", model=self.model, prompt=self.prompt)


class DetokenizeBody(_Body):
    model: str = Field(description="a served policy version, or the service alias")
    tokens: list[Int] = Field(description="token ids of the model's tokenizer")


class FeedbackBody(_Body):
    completion_id: str
    choice_index: Int | None = Field(
        None, description="which choice the feedback is about (default 0)", json_schema_extra=_doc(minimum=0)
    )
    thumb: Int | None = Field(
        None, description="+1 (up) or -1 (down)", json_schema_extra=_doc(anyOf=[{"enum": [1, -1]}, {"type": "null"}])
    )
    rating: Int | None = Field(None, description="Likert 1..7", json_schema_extra=_doc(minimum=1, maximum=7))
    ranking: list[Int | list[Int]] | None = Field(
        None,
        description="all choice indices of an n>1 completion, best first; a list inside is a tie, e.g. [2, [0, 3], 1]",
    )
    correction: str | None = Field(
        None,
        description="a better answer (becomes a demonstration)",
        json_schema_extra=_doc(minLength=1, maxLength=MAX_CORRECTION_CHARS, pattern=r"\S"),
    )
    comment: str | None = Field(None, json_schema_extra=_doc(maxLength=MAX_COMMENT_CHARS))
    flags: list[str] = Field(
        default_factory=list,
        description="e.g. not_following_instruction, made_up_facts",
        json_schema_extra=_doc(maxItems=MAX_FLAGS, items={"type": "string", "pattern": FLAG.pattern}),
    )
    idempotency_key: str | None = Field(None, description="or the Idempotency-Key header")
    # A named score (LangSmith: key, score or value, feedback_source; Langfuse: name, value, dataType).
    key: str | None = Field(
        None,
        validation_alias=AliasChoices("key", "name"),
        description="a named score's key (or Langfuse's name), e.g. helpfulness; with score",
        json_schema_extra=_doc(pattern=SCORE_KEY.pattern),
    )
    score: float | bool | str | None = Field(
        None,
        validation_alias=AliasChoices("score", "value"),
        description="a named score's value (or value): a number, true or false, or a category's name",
        json_schema_extra=_doc(maxLength=MAX_CATEGORY_CHARS, minLength=1),
    )
    data_type: ScoreType | None = Field(
        None,
        validation_alias=AliasChoices("data_type", "dataType"),
        description="NUMERIC, CATEGORICAL or BOOLEAN (optional: the value says which)",
    )
    metadata: dict[str, Any] | None = Field(None, description="free-form JSON kept with the feedback")
    source: str | None = Field(
        None,
        validation_alias=AliasChoices("source", "feedback_source"),
        description="who or what judged, e.g. user, model, api",
        json_schema_extra=_doc(minLength=1, maxLength=MAX_SOURCE_CHARS),
    )

    def to_input(self, header_key: str | None, trace: dict[str, str] | None = None) -> FeedbackInput:
        key = header_key if header_key is not None else self.idempotency_key
        data = self.model_dump(exclude={"idempotency_key", "ranking"})
        data["trace"] = trace
        ranking = ranks = None
        if self.ranking is not None:  # [2, [0, 3], 1] -> choices (2, 0, 3, 1), ranks (0, 1, 1, 2)
            groups = [item if isinstance(item, list) else [item] for item in self.ranking]
            ranking = [choice for group in groups for choice in group]
            if any(len(group) != 1 for group in groups):
                ranks = [rank for rank, group in enumerate(groups) for _ in group]
        return FeedbackInput(**data, ranking=ranking, ranks=ranks, idempotency_key=key)


def parse(model: type[_Body], data: Any) -> Any:
    """Validate a decoded JSON body into ``model``; raises InvalidRequest naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unrecognized request argument supplied: {where}", param=where) from None
        if error["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: {where}", param=where) from None
        raise InvalidRequest(f"Invalid value for {where}: {error['msg']}", param=where) from None


# ---- responses ---------------------------------------------------------------------------
def _usage(result: CompletionResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def legacy_logprobs(items: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    if items is None:
        return None
    text_offset, position = [], offset
    for item in items:
        text_offset.append(position)
        position += len(item.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [dict(i.top) for i in items],
        "text_offset": text_offset,
    }


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if items is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]
    }


def completion_response(result: CompletionResult) -> dict[str, Any]:
    return {
        "id": result.completion_id,
        "object": "text_completion",
        "created": result.created,
        "model": result.policy_version,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": legacy_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
                **({"prompt_logprobs": result.prompt_logprobs} if result.prompt_logprobs is not None else {}),
            }
            for c in result.choices
        ],
        "usage": _usage(result),
    }


def chat_response(result: CompletionResult) -> dict[str, Any]:
    return {
        "id": result.completion_id,
        "object": "chat.completion",
        "created": result.created,
        "model": result.policy_version,
        "choices": [
            {
                "index": c.index,
                "message": _message(c),
                "logprobs": chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ],
        "usage": _usage(result),
        **({"prompt_logprobs": result.prompt_logprobs} if result.prompt_logprobs is not None else {}),
    }


def completion_chunk(
    completion_id: str, created: int, model: str, deltas: list[ChoiceDelta], offsets: dict[int, int]
) -> dict[str, Any]:
    choices = []
    for d in deltas:
        choices.append(
            {
                "index": d.index,
                "text": d.text,
                "logprobs": legacy_logprobs(d.logprobs, offsets.get(d.index, 0)),
                "finish_reason": d.finish_reason,
            }
        )
        offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model, "choices": choices}


def chat_chunk(completion_id: str, created: int, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }


def _message(choice: Any) -> dict[str, Any]:
    if choice.tool_calls:
        return {"role": "assistant", "content": choice.content, "tool_calls": choice.tool_calls}
    return {"role": "assistant", "content": choice.text}


def _delta(d: ChoiceDelta) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": d.text} if d.text else {}
    if d.tool_calls:
        delta["tool_calls"] = d.tool_calls
    return delta


def chat_delta_choices(deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
    return [
        {
            "index": d.index,
            "delta": _delta(d),
            "logprobs": chat_logprobs(d.logprobs),
            "finish_reason": d.finish_reason,
        }
        for d in deltas
    ]


def usage_chunk(base: dict[str, Any], result: CompletionResult) -> dict[str, Any]:
    return {**base, "choices": [], "usage": _usage(result)}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
