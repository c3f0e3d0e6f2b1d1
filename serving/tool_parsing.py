"""tool_choice "auto": the model writes its calls in its own syntax (Hermes' ``<tool_call>{...}
</tool_call>``, Llama 3's JSON, Mistral's ``[TOOL_CALLS]``, ...) and one of vLLM's tool parsers,
named by ``--tool-call-parser`` as on vLLM's server, turns them into OpenAI's tool calls, whole
or streamed argument by argument. Without a parser an "auto" answer is text, as the model wrote it.

A forced call (tool_choice "required" or a named function) needs no parser: its answer is held
to the calls' JSON by structured outputs (serving.requests.parse_tool_calls).
"""

from __future__ import annotations

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
