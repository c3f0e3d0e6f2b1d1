"""tool_choice "auto": the model writes its calls in its own syntax (Hermes' ``<tool_call>{...}
</tool_call>``, Llama 3's JSON, Mistral's ``[TOOL_CALLS]``, ...) and one of vLLM's tool parsers,
named by ``--tool-call-parser`` as on vLLM's server, turns them into OpenAI's tool calls, whole
or streamed argument by argument. Without a parser an "auto" answer is text, as the model wrote it.

A forced call (tool_choice "required" or a named function) needs no parser: its answer is held
to the calls' JSON by structured outputs (serving.requests.parse_tool_calls), and
``ForcedCallStream`` streams it argument by argument as that JSON grows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.requests import GenerationRequest


class UnknownToolParser(ValueError):
    """A --tool-call-parser that vLLM does not have."""


def parser_names() -> list[str]:
    """The names vLLM's tool parsers are registered under."""
    from vllm.tool_parsers import ToolParserManager

    return sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers})


def load_parser(name: str) -> type:
    """vLLM's tool parser class registered as ``name``."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise UnknownToolParser(
            f"vLLM has no tool parser {name!r}; choose one of: {', '.join(parser_names())}"
        ) from None


def parses(request: GenerationRequest) -> bool:
    """Whether an answer to ``request`` is for a tool parser: it offers tools and lets the model
    choose (tool_choice "auto", or none given, OpenAI's default with tools)."""
    return bool(request.tools) and request.tool_choice in (None, "auto")


@dataclass
class AutoToolCalls:
    """One request's tool parsing: ``parse`` a whole answer, or ``stream`` one choice's deltas
    (a parser keeps the state of the stream it reads, so each streamed choice has its own)."""

    parser_cls: type
    tokenizer: Any
    request: GenerationRequest
    _tools: Any = field(init=False)
    _vllm_request: Any = field(init=False)
    _streams: dict[int, Any] = field(init=False, default_factory=dict)
    # Per streamed choice: the ids its calls were sent with (the log keeps those) and how much of
    # its text went out as content.
    _streamed_ids: dict[int, dict[int, str]] = field(init=False, default_factory=dict)
    _sent: dict[int, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        # What a parser reads of the request: the tools (the conversation was rendered already).
        vllm_request = ChatCompletionRequest.model_validate(
            {
                "model": "heed",
                "messages": [],
                "tools": self.request.tools,
                "tool_choice": "auto",
                "parallel_tool_calls": self.request.parallel_tool_calls,
            }
        )
        self._tools = vllm_request.tools
        # A parser may ask for what it reads (most: the special tokens its tags are made of).
        self._vllm_request = self._parser().adjust_request(vllm_request)

    def _parser(self) -> Any:
        return self.parser_cls(self.tokenizer, self._tools)

    @property
    def skip_special_tokens(self) -> bool:
        return bool(self._vllm_request.skip_special_tokens)

    def parse(self, index: int, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """Choice ``index``'s content (the text besides its calls; None if there is none) and its
        calls in OpenAI's shape (None if it made none), with the ids a stream sent them under."""
        info = self._parser().extract_tool_calls(text, self._vllm_request)
        if not info.tools_called or not info.tool_calls:
            return text, None
        sent = self._streamed_ids.get(index, {})
        calls = [
            {
                "id": sent.get(i) or c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for i, c in enumerate(info.tool_calls)
        ]
        return info.content or None, calls

    def stream(
        self,
        index: int,
        previous_text: str,
        current_text: str,
        previous_ids: Sequence[int],
        current_ids: Sequence[int],
        finished: bool,
    ) -> tuple[str, list[dict[str, Any]]]:
        """Choice ``index``'s new content and tool-call deltas (OpenAI's streamed shape: the first
        delta of a call has its index, id, type and name, the next ones pieces of its arguments)
        once its text grew from ``previous_text`` to ``current_text``. Text that may begin a call
        is held back until the parser knows, or the choice has ``finished`` without a call."""
        parser = self._streams.get(index)
        if parser is None:
            parser = self._streams[index] = self._parser()
        delta = parser.extract_tool_calls_streaming(
            previous_text,
            current_text,
            current_text[len(previous_text) :],
            previous_ids,
            current_ids,
            current_ids[len(previous_ids) :],
            self._vllm_request,
        )
        content = (delta.content or "") if delta is not None else ""
        calls = [call.model_dump(exclude_none=True) for call in delta.tool_calls] if delta is not None else []
        for call in calls:
            if call.get("id"):
                self._streamed_ids.setdefault(index, {})[call["index"]] = call["id"]
        self._sent[index] = self._sent.get(index, 0) + len(content)
        if finished and not self.called(index):  # what was held back as a possible call was text
            content += current_text[self._sent[index] :]
            self._sent[index] = len(current_text)
        return content, calls

    def called(self, index: int) -> bool:
        """Whether streamed choice ``index`` has sent a call."""
        return bool(self._streamed_ids.get(index))


@dataclass
class _Scan:
    """Where a "required" answer's JSON text ([{"name": ..., "parameters": {...}}, ...]) stands."""

    read: int = 0  # characters of the answer read so far
    depth: int = 0  # of [ and { outside strings: 1 in the list, 2 in a call
    in_string: bool = False
    escaped: bool = False
    token: str = ""  # the string being read at a call's level (a key, or the name)
    key: str | None = None  # the call's key whose value comes next (or is being read)
    after_colon: bool = False
    arguments_at: int | None = None  # where the text of the arguments being read starts
    calls: list[dict[str, Any]] = field(default_factory=list)  # per call: its name (None until read), arguments so far


@dataclass
class ForcedCallStream:
    """A forced answer's calls (tool_choice "required" or a named function) streamed as its JSON
    grows, argument by argument, as OpenAI streams calls: a call's index, id, type and name first,
    then the text of its arguments piece by piece. A named function's answer is its arguments;
    a "required" one is the list of {"name", "parameters"} that structured outputs hold it to."""

    request: GenerationRequest
    _scans: dict[int, _Scan] = field(default_factory=dict)
    _ids: dict[int, list[str]] = field(default_factory=dict)
    _arguments: dict[int, list[str]] = field(default_factory=dict)

    def feed(self, index: int, text: str) -> list[dict[str, Any]]:
        """Choice ``index``'s call deltas once its answer has grown to ``text``."""
        ids, arguments = self._ids.setdefault(index, []), self._arguments.setdefault(index, [])
        named = self.request.forced_tool()
        if named is not None:
            deltas: list[dict[str, Any]] = []
            if not ids:
                ids.append(_call_id())
                arguments.append("")
                deltas.append({"index": 0, "id": ids[0], "type": "function", "function": {"name": named}})
            if new := text[len(arguments[0]) :]:
                arguments[0] = text
                deltas.append({"index": 0, "function": {"arguments": new}})
            return deltas
        scan = self._scans.setdefault(index, _Scan())
        for position in range(scan.read, len(text)):
            _step(scan, text, position)
        scan.read = len(text)
        if scan.arguments_at is not None and scan.calls:  # arguments read so far, up to this delta
            scan.calls[-1]["arguments"] = text[scan.arguments_at :]
        return self._call_deltas(scan, ids, arguments)

    def _call_deltas(self, scan: _Scan, ids: list[str], arguments: list[str]) -> list[dict[str, Any]]:
        deltas = []
        for i, call in enumerate(scan.calls):
            if call.get("name") is None:
                break  # a call's name goes first; later calls wait for it
            if i == len(ids):
                ids.append(_call_id())
                arguments.append("")
                deltas.append({"index": i, "id": ids[i], "type": "function", "function": {"name": call["name"]}})
            new = call.get("arguments", "")[len(arguments[i]) :]
            if new:
                arguments[i] += new
                deltas.append({"index": i, "function": {"arguments": new}})
        return deltas

    def streamed(self, index: int, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """``calls`` (parsed from the whole answer) with the ids and argument texts the stream
        sent, so the log and the client agree."""
        ids, arguments = self._ids.get(index, []), self._arguments.get(index, [])
        if not calls or len(ids) != len(calls):
            return calls
        return [
            {**call, "id": ids[i], "function": {**call["function"], "arguments": arguments[i]}}
            for i, call in enumerate(calls)
        ]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _step(scan: _Scan, text: str, position: int) -> None:
    """Read one character of a "required" answer's JSON."""
    char = text[position]
    if scan.in_string:
        if scan.escaped:
            scan.escaped = False
        elif char == "\\":
            scan.escaped = True
        elif char == '"':
            scan.in_string = False
        if scan.depth == 2 and scan.arguments_at is None:
            scan.token += char
            if not scan.in_string:
                _string_read(scan)
        return
    if char == '"':
        scan.in_string = True
        if scan.depth == 2 and scan.arguments_at is None:
            scan.token = char
        return
    opens_arguments = scan.depth == 2 and scan.after_colon and scan.key == "parameters"
    if opens_arguments and scan.arguments_at is None and not char.isspace():
        scan.arguments_at = position
        scan.calls[-1]["arguments"] = ""
    if char in "[{":
        scan.depth += 1
        if scan.depth == 2:  # a call opens
            scan.calls.append({"name": None})
            scan.key, scan.after_colon = None, False
    elif char in "]}":
        if scan.depth == 2 and scan.arguments_at is not None:
            _arguments_read(scan, text, position)
        scan.depth -= 1
    elif scan.depth == 2:
        if char == ":":
            scan.after_colon = True
        elif char == ",":
            if scan.arguments_at is not None:
                _arguments_read(scan, text, position)
            scan.key, scan.after_colon = None, False


def _string_read(scan: _Scan) -> None:
    """A string at a call's level ended: a key, or the value of "name"."""
    value = json.loads(scan.token)
    if scan.after_colon and scan.key == "name":
        scan.calls[-1]["name"] = value
    elif not scan.after_colon:
        scan.key = value


def _arguments_read(scan: _Scan, text: str, end: int) -> None:
    scan.calls[-1]["arguments"] = text[scan.arguments_at : end].rstrip()
    scan.arguments_at = None
    scan.key, scan.after_colon = None, False
