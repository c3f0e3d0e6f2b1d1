"""tool_choice "auto" read by vLLM's own tool parser (serving.tool_parsing), on the bundled
tokenizer: whole answers and streams token by token, the ids a stream sent kept for the log."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.requests import GenerationRequest, parse_tool_calls
from serving.tool_parsing import AutoToolCalls, ForcedCallStream, UnknownToolParser, load_parser, parses
from tests.conftest import run_heed

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def auto(tokenizer, **fields) -> AutoToolCalls:
    request = GenerationRequest(
        endpoint="chat.completions", model="heed", messages=[{"role": "user", "content": "Weather?"}], **fields
    )
    return AutoToolCalls(load_parser("hermes"), tokenizer, request)


def stream(calls: AutoToolCalls, tokenizer, text: str, index: int = 0) -> tuple[str, list[dict]]:
    """Feed ``text`` token by token as an engine's deltas; the content and call deltas sent."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    content, deltas, previous = "", [], ""
    for i in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:i])
        piece, calls_delta = calls.stream(index, previous, current, ids[: i - 1], ids[:i], finished=i == len(ids))
        content += piece
        deltas += calls_delta
        previous = current
    return content, deltas


def test_a_whole_answer_gives_its_calls_and_the_text_before_them(tokenizer) -> None:
    calls = auto(tokenizer, tools=[WEATHER], tool_choice="auto")
    assert calls.skip_special_tokens is False  # Hermes' tags may be special tokens: the parser must see them

    content, made = calls.parse(0, "Let me look. " + CALL)
    assert content == "Let me look. "
    assert made is not None and len(made) == 1
    assert made[0]["type"] == "function" and made[0]["function"]["name"] == "get_weather"
    assert json.loads(made[0]["function"]["arguments"]) == {"city": "Paris"}
    assert made[0]["id"]

    assert calls.parse(0, CALL)[0] is None  # nothing besides the call: content null, as OpenAI's
    assert calls.parse(0, "It is sunny in Paris.") == ("It is sunny in Paris.", None)
    assert calls.parse(0, "<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", None)


def test_a_stream_sends_the_call_piece_by_piece_and_the_log_keeps_its_id(tokenizer) -> None:
    calls = auto(tokenizer, tools=[WEATHER])  # no tool_choice: auto, OpenAI's default with tools
    content, deltas = stream(calls, tokenizer, "Let me look. " + CALL)

    assert content == "Let me look. "
    first, *rest = deltas
    assert first["index"] == 0 and first["type"] == "function" and first["function"] == {"name": "get_weather"}
    assert len(rest) > 1 and all(d["index"] == 0 and set(d["function"]) == {"arguments"} for d in rest)
    assert json.loads("".join(d["function"]["arguments"] for d in rest)) == {"city": "Paris"}
    assert calls.called(0) and not calls.called(1)
    (logged,) = calls.parse(0, "Let me look. " + CALL)[1] or []
    assert logged["id"] == first["id"]  # the id the client will answer with tool_call_id


def test_a_stream_without_a_call_sends_all_its_text_even_what_looked_like_a_tag(tokenizer) -> None:
    calls = auto(tokenizer, tools=[WEATHER])
    text = "Plain words, then <tool"  # ends as a call could begin: held back until the end
    content, deltas = stream(calls, tokenizer, text, index=1)
    assert content == text and deltas == [] and not calls.called(1)


def test_only_auto_answers_with_tools_are_parsed() -> None:
    def request(**fields) -> GenerationRequest:
        return GenerationRequest(endpoint="chat.completions", model="heed", messages=[], **fields)

    assert parses(request(tools=[WEATHER])) and parses(request(tools=[WEATHER], tool_choice="auto"))
    assert not parses(request()) and not parses(request(tools=[WEATHER], tool_choice="none"))
    assert not parses(request(tools=[WEATHER], tool_choice="required"))  # forced: structured outputs
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert not parses(request(tools=[WEATHER], tool_choice=named))


def test_an_unknown_parser_is_named_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(UnknownToolParser, match=r"no tool parser 'nope'; choose one of: .*hermes.*llama3_json"):
        load_parser("nope")
    result = run_heed(tmp_path / "cache", "serve", "--tool-call-parser", "nope", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.strip().splitlines() if x.startswith("heed: error:")]
    assert line.startswith("heed: error: vLLM has no tool parser 'nope'; choose one of: ")
    assert not (tmp_path / "d").exists()  # before the data directory or an engine


CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def forced(tool_choice) -> GenerationRequest:
    return GenerationRequest(
        endpoint="chat.completions",
        model="heed",
        messages=[],
        tools=[WEATHER, CLOCK],
        tool_choice=tool_choice,
        stream=True,
    )


def assemble(deltas: list[dict]) -> list[dict]:
    """A client's reading of streamed call deltas (as the openai client's users do)."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        assert "id" not in d or call["id"] is None  # a call's id and name come once, first
        call["id"] = d.get("id") or call["id"]
        call["name"] += d.get("function", {}).get("name", "")
        call["arguments"] += d.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("seed", range(20))
def test_a_required_answer_streams_its_calls_argument_by_argument_however_it_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    request = forced("required")
    text = (
        '[{"name":"get_weather","parameters":{"city":"Pa\\"ris, \\u00e9]}"}},'
        ' {"name": "get_time", "parameters": {}},{"parameters":{"city":"Oslo"},"name":"get_weather"}]'
    )
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 30)))
    stream, deltas = ForcedCallStream(request), []
    for cut in [*cuts, len(text)]:
        deltas += stream.feed(0, text[:cut])

    calls = assemble(deltas)
    expected = json.loads(text)
    assert [c["name"] for c in calls] == [c["name"] for c in expected]
    assert [json.loads(c["arguments"]) for c in calls] == [c["parameters"] for c in expected]
    assert len(deltas) > len(calls)  # the arguments come after the names, not only whole
    final = stream.streamed(0, parse_tool_calls(request, text))
    assert [(c["id"], c["function"]["arguments"]) for c in final or []] == [(c["id"], c["arguments"]) for c in calls]


def test_a_named_function_streams_its_arguments_as_they_come() -> None:
    request = forced({"type": "function", "function": {"name": "get_weather"}})
    stream = ForcedCallStream(request)
    deltas = [d for grown in ('{"ci', '{"city":', '{"city":"Paris"', '{"city":"Paris"}') for d in stream.feed(3, grown)]
    (call,) = assemble(deltas)
    assert call["name"] == "get_weather" and call["arguments"] == '{"city":"Paris"}' and len(deltas) == 5
    (final,) = stream.streamed(3, parse_tool_calls(request, call["arguments"])) or []
    assert final["id"] == call["id"] and final["function"] == {"name": "get_weather", "arguments": call["arguments"]}


def test_a_required_answer_cut_short_sends_what_it_has_and_logs_no_call() -> None:
    request = forced("required")
    stream = ForcedCallStream(request)
    text = '[{"name":"get_weather","parameters":{"city":"Pa'
    (call,) = assemble(stream.feed(0, text))
    assert call["name"] == "get_weather" and call["arguments"] == '{"city":"Pa'
    assert stream.streamed(0, parse_tool_calls(request, text)) is None  # no complete call to log
