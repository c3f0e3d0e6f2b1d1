"""The records of the event log: what the serving half writes and the training half reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from heed.callers import caller_id

FeedbackKind = Literal["thumb", "rating", "ranking", "correction", "score"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = get_args(FeedbackKind)
# A named score's data types, as Langfuse names them: a number, one of a set of labels, true/false.
ScoreType = Literal["NUMERIC", "CATEGORICAL", "BOOLEAN"]
SCORE_TYPES: tuple[ScoreType, ...] = get_args(ScoreType)

# Flags a labeler may tick, after the paper's labeling interface; free-form flags are kept too.
KNOWN_FLAGS: tuple[str, ...] = (
    "not_following_instruction",
    "made_up_facts",
    "inappropriate",
    "harmful",
    "sexual_content",
    "violent_content",
    "denigrates_protected_class",
    "contains_pii",
)


_NAMES: dict[type, tuple[str, ...]] = {}


# Fields added after records were first shipped: written only when set, so that a reader of the
# version before them (a replica or trainer not yet upgraded) still loads the records of this one.
_LATER_FIELDS = frozenset(
    {"trace", "tool_calls", "key", "data_type", "score", "category", "metadata", "source", "caller"}
)


def _fields(record: Any, full: bool) -> dict[str, Any]:
    """A record's fields as a dict, for JSON: ``dataclasses.asdict`` without its deep copy (which
    was a fifth of an append's CPU time); the values (tuples, dicts of the request) are shared.
    A later field that is unset is left out, unless ``full``."""
    cls = type(record)
    names = _NAMES.get(cls) or _NAMES.setdefault(cls, tuple(f.name for f in dataclasses.fields(cls)))
    return {
        name: value
        for name in names
        if (value := getattr(record, name)) is not None or full or name not in _LATER_FIELDS
    }


@dataclass(frozen=True)
class ChoiceRecord:
    """One sampled answer of a completion request."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    # The tool calls parsed from ``text`` when the request forced them (OpenAI's shape).
    tool_calls: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class CompletionRecord:
    """A completion as served: who asked, which policy answered, with what, and how fast."""

    completion_id: str
    created: float
    principal: str
    policy_version: str
    endpoint: Literal["completions", "chat.completions"]
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    prompt_token_ids: tuple[int, ...]
    params: dict[str, Any]
    choices: tuple[ChoiceRecord, ...]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    user: str | None = None
    # W3C trace context (traceparent, tracestate) and the X-Request-Id of the request, if it sent them.
    trace: dict[str, str] | None = None
    # The caller its evidence counts under when that is not its ``user``: the principal, whose key
    # may not name end users (serving's --user-principals). None: ``user``, else the principal.
    caller: str | None = None

    @property
    def evidence_caller(self) -> str:
        """Who this completion was for, in the evidence the canary and the trainer weigh (heed.callers)."""
        return self.caller or caller_id(self.user, self.principal)

    def to_json(self, full: bool = False) -> dict[str, Any]:
        """As the log stores it; ``full``: every field, unset later ones as None (the API's view)."""
        data = _fields(self, full)
        data["choices"] = tuple(_fields(c, full) for c in self.choices)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompletionRecord:
        data = dict(data)
        data["choices"] = tuple(
            ChoiceRecord(
                **{
                    **c,
                    "token_ids": tuple(c["token_ids"]),
                    "tool_calls": tuple(c["tool_calls"]) if c.get("tool_calls") is not None else None,
                }
            )
            for c in data["choices"]
        )
        data["prompt_token_ids"] = tuple(data["prompt_token_ids"])
        if data.get("messages") is not None:
            data["messages"] = tuple(data["messages"])
        return cls(**data)


def check_ranks(ranks: Any, k: int) -> tuple[int, ...]:
    """The ranks of K answers listed best first (a ranking with ties): dense (0, then each the
    same as the one before, a tie, or one more), with at least two distinct ranks (a ranking
    where all tie says nothing). Raises ValueError."""
    if not isinstance(ranks, list | tuple) or len(ranks) != k or not all(type(r) is int for r in ranks):
        raise ValueError(f"must list {k} integers, one per answer")
    if ranks[0] != 0 or any(b - a not in (0, 1) for a, b in zip(ranks, ranks[1:], strict=False)):
        raise ValueError(f"must start at 0 and rise by 0 (a tie) or 1, best first; got {list(ranks)}")
    if ranks[-1] == 0:
        raise ValueError("ties every answer: there is no preference to learn")
    return tuple(ranks)


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback event on one completion: a thumb, a 1-7 rating, a ranking, a correction, or a
    named score (LangSmith's key and score, Langfuse's name, value and data type)."""

    feedback_id: str
    completion_id: str
    created: float
    principal: str
    kind: FeedbackKind
    choice_index: int | None = None
    thumb: int | None = None
    rating: int | None = None
    ranking: tuple[int, ...] | None = None  # choice indices, best first
    correction: str | None = None
    comment: str | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)
    idempotency_key: str | None = None
    # Copied from the completion so a reader need not join: the version the feedback is about.
    policy_version: str = ""
    # A ranking with ties: the rank of each entry of ``ranking`` (0 = best; equal = tied).
    ranks: tuple[int, ...] | None = None
    # A named score: its key, its data type, and its value: ``score`` for NUMERIC and BOOLEAN
    # (1.0 true, 0.0 false), ``category`` for CATEGORICAL.
    key: str | None = None
    data_type: ScoreType | None = None
    score: float | None = None
    category: str | None = None
    # The caller's own context for any kind: free-form JSON, and who or what judged (e.g. "user",
    # "model", "api", LangSmith's feedback_source).
    metadata: dict[str, Any] | None = None
    source: str | None = None
    # W3C trace context and request id of the request that carried this feedback (joins the app's traces).
    trace: dict[str, str] | None = None

    def content_hash(self) -> str:
        """A digest of what was said (not of ids or time): equal for a faithful retry."""
        said = {
            "completion_id": self.completion_id,
            "kind": self.kind,
            "choice_index": self.choice_index,
            "thumb": self.thumb,
            "rating": self.rating,
            "ranking": list(self.ranking) if self.ranking is not None else None,
            "correction": self.correction,
            "comment": self.comment,
            "flags": sorted(self.flags),
        }
        # The newer fields only when given: the digests of records without them are unchanged.
        if self.ranks is not None:
            said["ranks"] = list(self.ranks)
        for name in ("key", "data_type", "score", "category", "metadata", "source"):
            if getattr(self, name) is not None:
                said[name] = getattr(self, name)
        return hashlib.sha256(json.dumps(said, sort_keys=True).encode()).hexdigest()

    def to_json(self, full: bool = False) -> dict[str, Any]:
        """As the log stores it; ``full``: every field, unset later ones as None (the API's view)."""
        return _fields(self, full)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeedbackRecord:
        data = dict(data)
        for name in ("ranking", "ranks"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        data["flags"] = tuple(data.get("flags") or ())
        return cls(**data)


@dataclass(frozen=True)
class LogEntry:
    """A record at its place in the log; ``seq`` grows in commit order and is the watermark."""

    seq: int
    record: CompletionRecord | FeedbackRecord

    @classmethod
    def from_row(cls, seq: int, type_: str, body: str) -> LogEntry:
        """The entry of a stored row: its position, its type and its record's JSON."""
        data = json.loads(body)
        record = CompletionRecord.from_json(data) if type_ == "completion" else FeedbackRecord.from_json(data)
        return cls(seq=int(seq), record=record)


@dataclass(frozen=True)
class FeedbackSummary:
    """What one policy version's answers got, over a stretch of the log."""

    thumbs_up: int = 0
    thumbs_down: int = 0
    ratings: int = 0
    rating_sum: float = 0.0
    events: int = 0
    rankings: int = 0
    corrections: int = 0

    @property
    def thumbs(self) -> int:
        return self.thumbs_up + self.thumbs_down

    @property
    def rating_mean(self) -> float | None:
        return self.rating_sum / self.ratings if self.ratings else None


@dataclass(frozen=True)
class CallerThumbs:
    """One caller's thumbs on one policy version's answers, one vote per (completion, choice):
    the caller's latest. A caller is an API principal and, in ``user``, who it counts as: the
    completion's ``evidence_caller`` (the end user it named, else the principal; the principal
    too when its key may not name users)."""

    policy_version: str
    principal: str
    user: str
    up: int
    down: int


@dataclass(frozen=True)
class LoggedPrompt:
    """A distinct prompt of the log (a completion prompt or chat messages), how often it was
    asked, and the log position it was last asked at."""

    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    times: int
    last_seq: int
