"""tool_choice "auto" through the real service: a model that writes Hermes-style calls
(``<tool_call>{...}</tool_call>``), served with ``--tool-call-parser hermes``, answers the
official client with tool_calls, whole and streamed piece by piece, over HTTP and gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from openai import OpenAI

from heed.eventlog import open_store
from heed.v1 import completions_pb2, completions_pb2_grpc
from tests.conftest import ARTIFACTS, RunningServer, start_server
from tests.word_lists import teach
from training.data import Demonstration

pytestmark = pytest.mark.slow

KEYS = {"app": "sk-test-tools"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PROMPTS = ["The weather in Paris?", "Is it raining in Paris?", "How warm is Paris today?", "Paris weather, please."]


@pytest.fixture(scope="module")
def caller(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`heed serve --tool-call-parser hermes` on the tiny model taught to answer with CALL."""
    root = tmp_path_factory.mktemp("tool-caller")
    model = teach(tiny_model, root, [Demonstration(p, CALL) for p in PROMPTS * 16])
    server = start_server(
        model, root / "data", ARTIFACTS / "server-tool-calls.log", KEYS, "--tool-call-parser", "hermes"
    )
    yield server
    server.stop()
    assert server.process.returncode == 0, server.log_text()[-3000:]


def ask(content: str = PROMPTS[0]) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_the_calls_the_model_writes_come_back_as_tool_calls(caller: RunningServer) -> None:
    client = OpenAI(base_url=caller.http_url + "/v1", api_key=KEYS["app"], max_retries=0)
    answer = client.chat.completions.create(
        model="heed", messages=ask(), tools=[WEATHER], tool_choice="auto", max_tokens=40, temperature=0
    )
    defaulted = client.chat.completions.create(
        model="heed", messages=ask(), tools=[WEATHER], max_tokens=40, temperature=0
    )
    declined = client.chat.completions.create(
        model="heed", messages=ask(), tools=[WEATHER], tool_choice="none", max_tokens=40, temperature=0
    )
    calls: dict[int, dict] = {}
    pieces, finish, streamed_content, streamed_id = 0, None, "", ""
    for chunk in client.chat.completions.create(
        model="heed", messages=ask(), tools=[WEATHER], max_tokens=40, temperature=0, stream=True
    ):
        streamed_id = chunk.id
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            streamed_content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
                pieces += 1

    (call,) = answer.choices[0].message.tool_calls or []
    assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert defaulted.choices[0].message.tool_calls is not None  # tools without tool_choice: auto
    assert declined.choices[0].message.tool_calls is None and "<tool_call>" in (
        declined.choices[0].message.content or ""
    )
    (streamed,) = calls.values()
    assert finish == "tool_calls" and streamed_content == "" and pieces > 2  # id and name, then the arguments
    assert streamed["name"] == "get_weather" and json.loads(streamed["arguments"]) == {"city": "Paris"}

    # The answer goes back with the tool's result; the log keeps what the model wrote and the calls.
    answered = [
        *ask(),
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 12}'},
    ]
    follow = client.chat.completions.create(model="heed", messages=answered, tools=[WEATHER], max_tokens=8)
    assert follow.choices[0].finish_reason in ("tool_calls", "length", "stop")
    store = open_store(caller.data_dir / "events.db")
    logged = store.get_completion(answer.id)
    streamed_log = store.get_completion(streamed_id)
    store.close()
    assert logged.choices[0].text.strip() == CALL and logged.choices[0].finish_reason == "tool_calls"
    assert list(logged.choices[0].tool_calls or []) == [call.model_dump(exclude_none=True)]
    assert streamed_log.choices[0].tool_calls[0]["id"] == streamed["id"]  # the id the client saw


def test_grpc_streams_the_call_in_pieces_with_its_index(caller: RunningServer) -> None:
    tool = completions_pb2.Tool(
        name="get_weather",
        description="The weather in a city.",
        parameters=json.dumps(WEATHER["function"]["parameters"]),
    )
    request = completions_pb2.CompleteRequest(
        model="heed",
        chat=completions_pb2.ChatMessages(messages=[completions_pb2.ChatMessage(role="user", content=PROMPTS[1])]),
        tools=[tool],
        max_tokens=40,
        temperature=0,
    )
    metadata = [("authorization", f"Bearer {KEYS['app']}")]
    with grpc.insecure_channel(caller.grpc_target) as channel:
        stub = completions_pb2_grpc.CompletionsStub(channel)
        whole = stub.Complete(request, metadata=metadata, timeout=60)
        chunks = list(stub.StreamComplete(request, metadata=metadata, timeout=60))

    (call,) = whole.choices[0].tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.index == 0
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].text == ""
    pieces = [c for chunk in chunks for choice in chunk.choices for c in choice.tool_calls]
    assert len(pieces) > 2 and {p.index for p in pieces} == {0}
    assert pieces[0].name == "get_weather" and pieces[0].id
    assert json.loads("".join(p.arguments for p in pieces)) == {"city": "Paris"}
