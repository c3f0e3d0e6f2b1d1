"""The gRPC API: generated stubs, same semantics as HTTP, standard health and reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from heed.eventlog import open_store
from heed.v1 import completions_pb2, completions_pb2_grpc, feedback_pb2, feedback_pb2_grpc


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


def auth(server, principal: str = "alice") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server.keys[principal]}")]


def test_unary_complete_answers_and_logs_like_http(channel, server) -> None:
    stub = completions_pb2_grpc.CompletionsStub(channel)

    response = stub.Complete(
        completions_pb2.CompleteRequest(model="heed", prompt="gRPC says", max_tokens=5, n=2, seed=3),
        metadata=auth(server),
    )

    assert response.model == "tiny-v1" and response.id.startswith("cmpl-")
    assert len(response.choices) == 2 and response.usage.completion_tokens == 10
    assert [c.index for c in response.choices] == [0, 1] and all(c.finish_reason == "length" for c in response.choices)
    store = open_store(server.data_dir / "events.db")
    assert store.get_completion(response.id).principal == "alice"
    store.close()


def test_token_id_prompts_and_the_sampling_fields_of_http_work_over_grpc(channel, server) -> None:
    stub = completions_pb2_grpc.CompletionsStub(channel)
    request = completions_pb2.CompleteRequest(
        model="heed",
        prompt_token_ids=completions_pb2.TokenIds(ids=[1, 2, 3]),
        max_tokens=4,
        temperature=0,
        logit_bias={42: 100.0},
        min_tokens=4,
        ignore_eos=True,
        top_k=5,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )

    response = stub.Complete(request, metadata=auth(server))

    store = open_store(server.data_dir / "events.db")
    logged = store.get_completion(response.id)
    store.close()
    assert logged.prompt_token_ids == (1, 2, 3) and logged.choices[0].token_ids == (42,) * 4
    assert logged.params["top_k"] == 5 and logged.params["presence_penalty"] == 0.5
    with pytest.raises(grpc.RpcError) as refused:
        stub.Complete(
            completions_pb2.CompleteRequest(model="heed", prompt="hi", stop_token_ids=[10**9]), metadata=auth(server)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in refused.value.details()


def test_a_json_schema_response_format_over_grpc(channel, server) -> None:
    import json

    import jsonschema

    from tests.serving.test_openai_api import THING

    stub = completions_pb2_grpc.CompletionsStub(channel)
    chat = completions_pb2.ChatMessages(messages=[completions_pb2.ChatMessage(role="user", content="A thing?")])
    fmt = completions_pb2.ResponseFormat(type="json_schema", json_schema=json.dumps(THING))

    response = stub.Complete(
        completions_pb2.CompleteRequest(model="heed", chat=chat, max_tokens=60, seed=4, response_format=fmt),
        metadata=auth(server),
    )

    jsonschema.validate(json.loads(response.choices[0].text), THING)


def test_chat_over_grpc_uses_the_chat_template(channel, server) -> None:
    stub = completions_pb2_grpc.CompletionsStub(channel)
    chat = completions_pb2.ChatMessages(messages=[completions_pb2.ChatMessage(role="user", content="Hi")])

    response = stub.Complete(
        completions_pb2.CompleteRequest(model="heed", chat=chat, max_tokens=3), metadata=auth(server)
    )

    assert response.id.startswith("chatcmpl-") and response.usage.prompt_tokens > 10


def test_stream_complete_streams_deltas_and_ends_with_usage(channel, server) -> None:
    stub = completions_pb2_grpc.CompletionsStub(channel)

    chunks = list(
        stub.StreamComplete(
            completions_pb2.CompleteRequest(model="heed", prompt="Go", max_tokens=8, logprobs=1), metadata=auth(server)
        )
    )

    text = "".join(c.text for chunk in chunks for c in chunk.choices)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 8
    assert sum(len(c.logprobs) for chunk in chunks for c in chunk.choices) == 8
    store = open_store(server.data_dir / "events.db")
    assert store.get_completion(chunks[0].id).choices[0].text == text
    store.close()


def test_feedback_over_grpc_is_logged_and_idempotent(channel, server) -> None:
    completion = completions_pb2_grpc.CompletionsStub(channel).Complete(
        completions_pb2.CompleteRequest(model="heed", prompt="x", max_tokens=2, n=3), metadata=auth(server)
    )
    stub = feedback_pb2_grpc.FeedbackStub(channel)
    request = feedback_pb2.FeedbackRequest(
        completion_id=completion.id,
        ranking=feedback_pb2.Ranking(choice_indices=[1, 2, 0]),
        idempotency_key="grpc-key-1",
    )

    first = stub.Submit(request, metadata=auth(server))
    again = stub.Submit(request, metadata=auth(server))

    assert first.kind == "ranking" and not first.replayed
    assert again.id == first.id and again.replayed
    tied = stub.Submit(
        feedback_pb2.FeedbackRequest(
            completion_id=completion.id, ranking=feedback_pb2.Ranking(choice_indices=[1, 2, 0], ranks=[0, 0, 1])
        ),
        metadata=auth(server),
    )
    store = open_store(server.data_dir / "events.db")
    assert [(f.ranking, f.ranks) for f in store.feedback_for(completion.id)] == [
        ((1, 2, 0), None),
        ((1, 2, 0), (0, 0, 1)),
    ]
    assert tied.kind == "ranking"
    store.close()
    with pytest.raises(grpc.RpcError) as refused:
        stub.Submit(
            feedback_pb2.FeedbackRequest(
                completion_id=completion.id, ranking=feedback_pb2.Ranking(choice_indices=[1, 2, 0], ranks=[0, 2, 3])
            ),
            metadata=auth(server),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tool_calls_and_prompt_logprobs_over_grpc(channel, server) -> None:
    import json

    stub = completions_pb2_grpc.CompletionsStub(channel)
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    weather = completions_pb2.Tool(name="get_weather", description="The weather.", parameters=json.dumps(schema))
    asked = [completions_pb2.ChatMessage(role="user", content="Weather?")]

    def chat(messages, **fields):
        return completions_pb2.CompleteRequest(
            model="heed", chat=completions_pb2.ChatMessages(messages=messages), tools=[weather], max_tokens=60, **fields
        )

    named = stub.Complete(
        chat(asked, tool_choice=completions_pb2.ToolChoice(function="get_weather"), seed=1), metadata=auth(server)
    )
    chunks = list(
        stub.StreamComplete(
            chat(asked, tool_choice=completions_pb2.ToolChoice(mode="required"), parallel_tool_calls=False, seed=2),
            metadata=auth(server),
        )
    )
    (call,) = named.choices[0].tool_calls
    answered = [
        *asked,
        completions_pb2.ChatMessage(role="assistant", tool_calls=[call]),
        completions_pb2.ChatMessage(role="tool", tool_call_id=call.id, content='{"temperature": 12}'),
    ]
    follow = stub.Complete(chat(answered), metadata=auth(server))
    scored = stub.Complete(
        completions_pb2.CompleteRequest(model="heed", prompt="One two three", max_tokens=1, prompt_logprobs=1),
        metadata=auth(server),
    )
    with pytest.raises(grpc.RpcError) as bad_mode:
        stub.Complete(chat(asked, tool_choice=completions_pb2.ToolChoice(mode="always")), metadata=auth(server))

    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    streamed = [c for chunk in chunks for choice in chunk.choices for c in choice.tool_calls]
    # One call, streamed in pieces: its id and name first, then its arguments.
    assert {c.index for c in streamed} == {0} and len(streamed) > 2, [
        (ch.text, ch.finish_reason) for k in chunks for ch in k.choices
    ]
    assert streamed[0].name == "get_weather" and streamed[0].id and not any(c.name or c.id for c in streamed[1:])
    assert json.loads("".join(c.arguments for c in streamed))["city"]
    assert any(ch.finish_reason == "tool_calls" for k in chunks for ch in k.choices)
    assert not follow.choices[0].tool_calls
    positions = scored.prompt_logprobs
    assert len(positions) == scored.usage.prompt_tokens and not positions[0].entries
    assert all(1 <= len(p.entries) <= 2 and all(e.logprob <= 0 for e in p.entries) for p in positions[1:])
    assert bad_mode.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    store = open_store(server.data_dir / "events.db")
    logged = store.get_completion(follow.id)
    store.close()
    assert logged.messages[1]["tool_calls"][0]["id"] == call.id and logged.messages[2]["tool_call_id"] == call.id


def test_named_scores_and_trace_context_over_grpc(channel, server) -> None:
    from google.protobuf import struct_pb2

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced = auth(server) + [("traceparent", parent), ("x-request-id", "grpc-req-7")]
    completion = completions_pb2_grpc.CompletionsStub(channel).Complete(
        completions_pb2.CompleteRequest(model="heed", prompt="x", max_tokens=2), metadata=traced
    )
    stub = feedback_pb2_grpc.FeedbackStub(channel)
    metadata = struct_pb2.Struct()
    metadata.update({"screen": "answer", "ms": 1200})

    receipts = [
        stub.Submit(
            feedback_pb2.FeedbackRequest(completion_id=completion.id, score=score, metadata=metadata, source="user"),
            metadata=traced,
        )
        for score in (
            feedback_pb2.Score(key="helpfulness", number=0.25),
            feedback_pb2.Score(key="thumbs_up", boolean=True),
            feedback_pb2.Score(key="tone", category="curt"),
        )
    ]
    with pytest.raises(grpc.RpcError) as no_value:
        stub.Submit(
            feedback_pb2.FeedbackRequest(completion_id=completion.id, score=feedback_pb2.Score(key="x")),
            metadata=auth(server),
        )

    assert [r.kind for r in receipts] == ["score"] * 3
    assert no_value.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    store = open_store(server.data_dir / "events.db")
    stored = store.feedback_for(completion.id)
    logged = store.get_completion(completion.id)
    store.close()
    assert [(f.key, f.data_type, f.score, f.category) for f in stored] == [
        ("helpfulness", "NUMERIC", 0.25, None),
        ("thumbs_up", "BOOLEAN", 1.0, None),
        ("tone", "CATEGORICAL", None, "curt"),
    ]
    assert all(f.metadata == {"screen": "answer", "ms": 1200.0} and f.source == "user" for f in stored)
    assert logged.trace == {"traceparent": parent, "request_id": "grpc-req-7"}
    assert all(f.trace == logged.trace for f in stored)


@pytest.mark.parametrize(
    ("call", "principal", "code"),
    [
        ("no-key", None, grpc.StatusCode.UNAUTHENTICATED),
        ("bad-temperature", "alice", grpc.StatusCode.INVALID_ARGUMENT),
        ("no-input", "alice", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown-model", "alice", grpc.StatusCode.NOT_FOUND),
        ("unknown-completion", "alice", grpc.StatusCode.NOT_FOUND),
        ("not-my-completion", "bob", grpc.StatusCode.PERMISSION_DENIED),
        ("rating-out-of-range", "alice", grpc.StatusCode.INVALID_ARGUMENT),
        ("idempotency-conflict", "alice", grpc.StatusCode.ALREADY_EXISTS),
    ],
)
def test_caller_errors_map_to_grpc_status_codes(channel, server, call, principal, code) -> None:
    completions = completions_pb2_grpc.CompletionsStub(channel)
    feedback = feedback_pb2_grpc.FeedbackStub(channel)
    metadata = auth(server, principal) if principal else []
    owned = completions.Complete(
        completions_pb2.CompleteRequest(model="heed", prompt="x", max_tokens=1), metadata=auth(server)
    )
    calls = {
        "no-key": lambda: completions.Complete(
            completions_pb2.CompleteRequest(model="heed", prompt="x"), metadata=metadata
        ),
        "bad-temperature": lambda: completions.Complete(
            completions_pb2.CompleteRequest(model="heed", prompt="x", temperature=9), metadata=metadata
        ),
        "no-input": lambda: completions.Complete(completions_pb2.CompleteRequest(model="heed"), metadata=metadata),
        "unknown-model": lambda: completions.Complete(
            completions_pb2.CompleteRequest(model="nope", prompt="x"), metadata=metadata
        ),
        "unknown-completion": lambda: feedback.Submit(
            feedback_pb2.FeedbackRequest(completion_id="cmpl-nope", thumb=1), metadata=metadata
        ),
        "not-my-completion": lambda: feedback.Submit(
            feedback_pb2.FeedbackRequest(completion_id=owned.id, thumb=1), metadata=metadata
        ),
        "rating-out-of-range": lambda: feedback.Submit(
            feedback_pb2.FeedbackRequest(completion_id=owned.id, rating=9), metadata=metadata
        ),
        "idempotency-conflict": lambda: (
            feedback.Submit(
                feedback_pb2.FeedbackRequest(completion_id=owned.id, thumb=1, idempotency_key="c"), metadata=metadata
            ),
            feedback.Submit(
                feedback_pb2.FeedbackRequest(completion_id=owned.id, thumb=-1, idempotency_key="c"), metadata=metadata
            ),
        ),
    }

    with pytest.raises(grpc.RpcError) as caught:
        calls[call]()

    assert caught.value.code() == code
    assert caught.value.details()


def test_health_reports_serving_for_the_server_and_each_service(channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)

    for service in ("", "heed.v1.Completions", "heed.v1.Feedback"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_heed_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    (response,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))

    names = {s.name for s in response.list_services_response.service}
    assert {"heed.v1.Completions", "heed.v1.Feedback", "heed.v1.Rollout", "grpc.health.v1.Health"} <= names
