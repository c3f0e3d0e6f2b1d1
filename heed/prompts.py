"""One prompt encoding for both halves: how a prompt becomes the token ids the model sees.

The serving half encodes what a caller sends (`encode_chat` for `/v1/chat/completions`,
`encode_raw` for a `/v1/completions` text prompt) and logs the ids it served
(`CompletionRecord.prompt_token_ids`). The training half trains on exactly those ids: a prompt
built from the log is a `ServedPrompt` that carries them, and `encode_prompt` returns them as
they are. Only a prompt without served ids (a training file's) is encoded here, the same way:

    "text"                     a training file's string prompt: one user turn, chat template
    (message, ...)             a chat: chat template, roles mapped (developer -> system)
    ServedPrompt(text=...)     a /v1/completions prompt: the text as it is, no template
    ServedPrompt(messages=...) a /v1/chat/completions prompt: as a chat
    ServedPrompt(token_ids=...) the ids as served, whatever the text or messages

This is the bottom layer: it imports only heed.* and the standard library, and takes any
Hugging Face tokenizer (or vLLM's wrapper of one).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from heed.eventlog.records import CompletionRecord

log = logging.getLogger(__name__)

Chat = tuple[dict[str, str], ...]

# OpenAI's `developer` role is the `system` role of the chat templates of open models.
ROLE_ALIASES = {"developer": "system"}


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template, so a chat cannot be encoded as it would be served."""


@dataclass(frozen=True)
class ServedPrompt:
    """A prompt as a completion endpoint took it, with the token ids it was served as (taken from
    the log; None for one that was never served). ``text``: a `/v1/completions` prompt, encoded
    raw (no chat template); ``messages``: a `/v1/chat/completions` prompt. Both are None for a
    `/v1/completions` prompt sent as token ids."""

    text: str | None = None
    messages: Chat | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.text is not None and self.messages is not None:
            raise ValueError("a served prompt is either a text (raw) or a chat (messages), not both")
        if self.text is None and self.messages is None and not self.token_ids:
            raise ValueError("a served prompt needs a text, messages or its token ids")

    @property
    def raw(self) -> bool:
        """True for a `/v1/completions` prompt: encoded without the chat template."""
        return self.messages is None


# A prompt of the training data: a file's string prompt (one user turn), a chat, or a served prompt.
Prompt = str | Chat | ServedPrompt


def served_prompt(record: CompletionRecord) -> ServedPrompt:
    """The prompt of a logged completion, with the token ids it was served as."""
    if record.messages is not None:
        return ServedPrompt(messages=tuple(dict(m) for m in record.messages), token_ids=tuple(record.prompt_token_ids))
    return ServedPrompt(text=record.prompt, token_ids=tuple(record.prompt_token_ids))


# What a message may carry besides its role and content, for the chat templates that use them.
TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


def chat_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: role and content, OpenAI's roles mapped, and
    an assistant's tool calls (their arguments as objects, as vLLM's server renders them) and a
    tool answer's call id where given."""
    out = []
    for m in messages:
        message = {"role": ROLE_ALIASES.get(m["role"], m["role"]), "content": m["content"]}
        if m["role"] in ("assistant", "tool"):
            message.update({k: m[k] for k in TOOL_FIELDS if m.get(k)})
        if message.get("tool_calls"):
            message["tool_calls"] = [_with_object_arguments(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _with_object_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    with contextlib.suppress(ValueError):  # the server refuses such a call; a file's stays as it is
        function["arguments"] = json.loads(function.get("arguments") or "{}")
    return {**call, "function": function}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(
    tokenizer: Any, messages: Iterable[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """A chat as `/v1/chat/completions` serves it: the chat template with the assistant's turn
    opened, and the tools given to the template (as vLLM's server does: a template that knows no
    tools leaves them out). Raises NoChatTemplate when the tokenizer has none."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("this model has no chat template")
    ids = tokenizer.apply_chat_template(
        chat_messages(messages), tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def encode_raw(tokenizer: Any, text: str) -> list[int]:
    """A `/v1/completions` text prompt as served: the text as it is, no template, no BOS."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_plain(tokenizer: Any, messages: Iterable[Mapping[str, str]]) -> list[int]:
    """Training only, for a model without a chat template (the server refuses chats then): the
    contents one per line, with the tokenizer's special tokens."""
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text).input_ids)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The token ids the model sees for ``prompt``: the served ids when it carries them, else
    the prompt encoded as it would be served (see the module's table)."""
    if isinstance(prompt, ServedPrompt):
        if prompt.token_ids is not None:
            if _fits(tokenizer, prompt.token_ids):
                return list(prompt.token_ids)
            if prompt.text is None and prompt.messages is None:
                raise ValueError("served prompt token ids outside this tokenizer's vocabulary, and no text to encode")
            # Another tokenizer's ids (a log from another base model): one bad record must not
            # stop every round, so the text is encoded as it would be served now.
            log.warning("served prompt ids outside this tokenizer's vocabulary: encoding the prompt's text instead")
        if prompt.text is not None:
            return encode_raw(tokenizer, prompt.text)
        assert prompt.messages is not None
        return _encode_messages(tokenizer, prompt.messages)
    if isinstance(prompt, str):
        return _encode_messages(tokenizer, ({"role": "user", "content": prompt},))
    return _encode_messages(tokenizer, prompt)


def _encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    return encode_chat(tokenizer, messages) if has_chat_template(tokenizer) else _encode_plain(tokenizer, messages)


def _fits(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether the tokenizer's vocabulary holds every id (unknown size: assume so)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    return size is None or all(0 <= t < size for t in ids)
