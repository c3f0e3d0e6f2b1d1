"""Training data: the JSONL formats, their importers (bad records reported by file and line),
and the tokenization every stage shares (the prompt as served, loss on the response).

Formats (one JSON object per line; see docs/training.md):
  demonstrations  {"prompt": str | "messages": [...], "response": str}
                  (or "messages" ending with the assistant's answer)
  comparisons     {"prompt" | "messages", "responses": [best, ..., worst]}   K >= 2
                  (+ optional "ranks": [0, 1, 1, 2]: equal ranks are ties, no pair between them)
                  {"prompt" | "messages", "chosen": str, "rejected": str}    K = 2
                  {"chosen": dialogue, "rejected": dialogue}  (hh-rlhf "\\n\\nAssistant:" form)
                  (+ optional "kind": the signal it came from, "ranking" (the default), "thumbs"
                  (an answer voted up and one voted down), "rating" (answers rated differently) or
                  "correction" (a user's corrected text over the model's answer): it picks its weight)
  judged          {"prompt" | "messages", "response": str, "desirable": bool}  one answer, unpaired
                  (a thumb up or down: what KTO trains on, and the reward model's pointwise loss)
  ratings         {"prompt" | "messages", "response": str, "rating": 1..7}  one answer, rated
  prompts         {"prompt" | "messages"}  or a bare JSON string
  text            {"text": str}            or a bare JSON string (the pretraining mix for ptx)

A string "prompt" is one user turn (chat template). A prompt built from the event log also has
"prompt_token_ids" (the ids it was served as, which every stage then trains on as they are) and,
for a `/v1/completions` prompt, "raw": true (its text had no chat template); a `/v1/completions`
prompt sent as token ids has "prompt_token_ids" alone. See heed/prompts.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from heed.eventlog.records import check_ranks
from heed.prompts import Chat, Prompt, ServedPrompt, encode_prompt

log = logging.getLogger(__name__)

T = TypeVar("T")
# A prompt (heed.prompts.Prompt) is a plain string (sent as one user turn), a chat (a tuple of
# {"role", "content"}) or a ServedPrompt (a prompt from the event log, with its served token ids).


@dataclass(frozen=True)
class Demonstration:
    """A prompt and the answer a labeler wrote (or corrected) for it."""

    prompt: Prompt
    response: str


# The signal a comparison came from (its weight in the reward model's loss is that kind's).
ComparisonKind = Literal["ranking", "thumbs", "rating", "correction"]
COMPARISON_KINDS: tuple[ComparisonKind, ...] = typing.get_args(ComparisonKind)
RATINGS = range(1, 8)  # the feedback API's 1-7 scale


@dataclass(frozen=True)
class Comparison:
    """A prompt and K >= 2 answers ranked best first. ``ranks`` (0 = best, non-decreasing, equal
    = tied) when the labeler tied some; None means every answer has its own rank. ``kind``: the
    signal it came from (a labeler's ranking, two thumbs, two ratings, a correction)."""

    prompt: Prompt
    responses: tuple[str, ...]
    ranks: tuple[int, ...] | None = None
    kind: ComparisonKind = "ranking"

    def rank_list(self) -> tuple[int, ...]:
        return self.ranks if self.ranks is not None else tuple(range(len(self.responses)))


@dataclass(frozen=True)
class Judged:
    """One answer to a prompt, judged on its own: desirable (a thumb up) or not (a thumb down)."""

    prompt: Prompt
    response: str
    desirable: bool


@dataclass(frozen=True)
class Rated:
    """One answer to a prompt, rated on its own on the 1-7 scale (7 best)."""

    prompt: Prompt
    response: str
    rating: int


@dataclass(frozen=True)
class BadRecord:
    """A line that could not be read as a record of the expected format."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class BadRecordsError(ValueError):
    """Raised instead of skipping when bad records are refused (``--strict``)."""

    def __init__(self, bad: Sequence[BadRecord]) -> None:
        self.bad = list(bad)
        shown = "\n  ".join(str(b) for b in self.bad[:10])
        more = f"\n  ... and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
        super().__init__(f"{len(self.bad)} bad record(s):\n  {shown}{more}")


# ---- parsing one record -------------------------------------------------------------------------


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string")
    return value


def _messages(value: Any) -> Chat:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must have string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _token_ids(obj: dict[str, Any]) -> tuple[int, ...] | None:
    value = obj.get("prompt_token_ids")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(type(t) is int and t >= 0 for t in value):
        raise ValueError("'prompt_token_ids' must be a non-empty list of token ids")
    return tuple(value)


def _prompt(obj: Any, messages: Chat | None = None) -> Prompt:
    """A prompt; ``messages``: the object's chat already read (a demonstration's, its answer cut)."""
    if isinstance(obj, str) and obj.strip():
        return obj
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    raw = obj.get("raw", False)
    if not isinstance(raw, bool):
        raise ValueError("'raw' must be true or false")
    ids = _token_ids(obj)
    if messages is not None or "messages" in obj:
        if raw:
            raise ValueError("'raw' is for a 'prompt' text; 'messages' always go through the chat template")
        messages = messages if messages is not None else _messages(obj["messages"])
        if messages[-1]["role"] == "assistant":
            raise ValueError("a prompt's messages must not end with the assistant's answer")
        return messages if ids is None else ServedPrompt(messages=messages, token_ids=ids)
    if "prompt" in obj:
        text = _text(obj, "prompt")
        if raw:  # a /v1/completions prompt: no chat template
            return ServedPrompt(text=text, token_ids=ids)
        if ids is not None:
            raise ValueError("'prompt_token_ids' with a 'prompt' text needs 'raw': true ('messages' for a chat)")
        return text
    if ids is not None:  # a /v1/completions prompt sent as token ids
        return ServedPrompt(token_ids=ids)
    raise ValueError("needs 'prompt', 'messages' or 'prompt_token_ids'")


def parse_demonstration(obj: Any) -> Demonstration:
    if isinstance(obj, dict) and "messages" in obj and "response" not in obj:
        messages = _messages(obj["messages"])
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError("without 'response', 'messages' must end with an assistant answer")
        return Demonstration(_prompt(obj, messages[:-1]), messages[-1]["content"])
    return Demonstration(_prompt(obj), _text(obj, "response"))


def parse_judged(obj: Any) -> Judged:
    desirable = obj.get("desirable") if isinstance(obj, dict) else None
    if not isinstance(desirable, bool):
        raise ValueError("'desirable' must be true or false")
    return Judged(_prompt(obj), _text(obj, "response"), desirable)


def parse_rated(obj: Any) -> Rated:
    rating = obj.get("rating") if isinstance(obj, dict) else None
    if type(rating) is not int or rating not in RATINGS:
        raise ValueError("'rating' must be an integer from 1 to 7")
    return Rated(_prompt(obj), _text(obj, "response"), rating)


def _split_dialogue(text: str) -> tuple[str, str]:
    cut = text.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("a dialogue without 'prompt' must contain '\\n\\nAssistant:'")
    return text[: cut + len("\n\nAssistant:")], text[cut + len("\n\nAssistant:") :].strip()


def _kind(obj: dict[str, Any]) -> ComparisonKind:
    kind = obj.get("kind", "ranking")
    if kind not in COMPARISON_KINDS:
        raise ValueError(f"'kind' must be one of {', '.join(COMPARISON_KINDS)}")
    return typing.cast(ComparisonKind, kind)


def parse_comparison(obj: Any) -> Comparison:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "responses" in obj:
        responses = obj["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise ValueError("'responses' must list at least 2 answers, best first")
        if not all(isinstance(r, str) and r.strip() for r in responses):
            raise ValueError("every response must be a non-empty string")
        try:
            ranks = check_ranks(obj["ranks"], len(responses)) if obj.get("ranks") is not None else None
        except ValueError as exc:
            raise ValueError(f"'ranks': {exc}") from None
        strict = ranks == tuple(range(len(responses)))
        return Comparison(_prompt(obj), tuple(responses), None if strict else ranks, _kind(obj))
    chosen, rejected = _text(obj, "chosen"), _text(obj, "rejected")
    if "prompt" in obj or "messages" in obj or "prompt_token_ids" in obj:
        return Comparison(_prompt(obj), (chosen, rejected), kind=_kind(obj))
    # hh-rlhf: two whole dialogues sharing every turn but the last answer.
    prompt, chosen_answer = _split_dialogue(chosen)
    prompt_r, rejected_answer = _split_dialogue(rejected)
    if prompt != prompt_r:
        raise ValueError("'chosen' and 'rejected' dialogues differ before the last answer")
    if not chosen_answer or not rejected_answer:
        raise ValueError("an empty last answer")
    return Comparison(prompt.strip(), (chosen_answer, rejected_answer))


def parse_prompt(obj: Any) -> Prompt:
    return _prompt(obj)


def parse_text(obj: Any) -> str:
    if isinstance(obj, str) and obj.strip():
        return obj
    if isinstance(obj, dict):
        return _text(obj, "text")
    raise ValueError("expected a JSON string or an object with 'text'")


# ---- reading and writing files ------------------------------------------------------------------


def read_jsonl(path: Path | str, parse: Callable[[Any], T], strict: bool = False) -> list[T]:
    """Every record of ``path`` (``.gz`` too) read with ``parse``; bad lines are logged with file:line and
    skipped, or, with ``strict``, refused all together in one BadRecordsError."""
    records: list[T] = []
    bad: list[BadRecord] = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
                bad.append(BadRecord(str(path), number, str(exc)))
    if bad and strict:
        raise BadRecordsError(bad)
    for b in bad:
        log.warning("skipping bad record %s", b)
    return records


def read_demonstrations(path: Path | str, strict: bool = False) -> list[Demonstration]:
    return read_jsonl(path, parse_demonstration, strict)


def read_judged(path: Path | str, strict: bool = False) -> list[Judged]:
    return read_jsonl(path, parse_judged, strict)


def read_ratings(path: Path | str, strict: bool = False) -> list[Rated]:
    return read_jsonl(path, parse_rated, strict)


def read_comparisons(path: Path | str, strict: bool = False) -> list[Comparison]:
    return read_jsonl(path, parse_comparison, strict)


def read_prompts(path: Path | str, strict: bool = False) -> list[Prompt]:
    return read_jsonl(path, parse_prompt, strict)


def read_texts(path: Path | str, strict: bool = False) -> list[str]:
    return read_jsonl(path, parse_text, strict)


def prompt_json(prompt: Prompt) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not isinstance(prompt, ServedPrompt):
        return {"messages": list(prompt)}
    out: dict[str, Any] = {}
    if prompt.messages is not None:
        out["messages"] = list(prompt.messages)
    elif prompt.text is not None:
        out.update(prompt=prompt.text, raw=True)
    if prompt.token_ids is not None:
        out["prompt_token_ids"] = list(prompt.token_ids)
    return out


def to_json(record: Demonstration | Comparison | Judged | Rated | Prompt) -> dict[str, Any]:
    """The JSONL object of a record (the inverse of the parse_* functions)."""
    if isinstance(record, Rated):
        return {**prompt_json(record.prompt), "response": record.response, "rating": record.rating}
    if isinstance(record, Judged):
        return {**prompt_json(record.prompt), "response": record.response, "desirable": record.desirable}
    if isinstance(record, Demonstration):
        return {**prompt_json(record.prompt), "response": record.response}
    if isinstance(record, Comparison):
        ranks = {"ranks": list(record.ranks)} if record.ranks is not None else {}
        kind = {"kind": record.kind} if record.kind != "ranking" else {}
        return {**prompt_json(record.prompt), "responses": list(record.responses), **ranks, **kind}
    return prompt_json(record)


def write_jsonl(path: Path | str, records: Iterable[Any]) -> int:
    """Write records (dataclasses above, prompts, or plain dicts) one per line; returns the count."""
    count = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record if isinstance(record, dict) else to_json(record)) + "\n")
            count += 1
    return count


# ---- tokenization -------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The prompt as the model sees it: the token ids it was served as when it carries them (a
    prompt from the event log), else encoded as the server would (heed.prompts.encode_prompt: a
    chat or a string's one user turn through the chat template with the assistant turn opened, a
    raw `/v1/completions` text as it is)."""
    return encode_prompt(tokenizer, prompt)


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """The answer's tokens and the end-of-turn token the model must learn to emit."""
    return list(tokenizer(response, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]


def empty_answers(tokenizer: Any, responses: Sequence[Sequence[int]]) -> list[bool]:
    """Which sampled answers (token ids) have no visible text: nothing, or only whitespace and
    special tokens before the end. No one reads them as an answer."""
    return [not tokenizer.decode(list(r), skip_special_tokens=True).strip() for r in responses]


def text_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)[:max_length]


def pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[Any, Any]:
    """(input_ids, attention_mask) as LongTensors, padded on the right (or the left)."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if not s:
            continue
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def seeded_sample(items: list[T], limit: int, seed: int) -> list[T]:
    """``items`` whole when there are ``limit`` or fewer (or ``limit`` is 0), else a sample of
    ``limit`` drawn with ``seed``: the same items for the same seed, whichever process draws."""
    if limit <= 0 or len(items) <= limit:
        return items
    return random.Random(seed).sample(items, limit)
