"""The feedback service core: checks a feedback event against its completion and logs it."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from heed.eventlog import (
    FEEDBACK_KINDS,
    CompletionRecord,
    FeedbackKind,
    FeedbackRecord,
    IdempotencyConflict,
    ScoreType,
    check_ranks,
)
from serving.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from serving.event_writer import EventWriter
from serving.metrics import ServiceMetrics
from serving.requests import check_key_text, check_text

MAX_COMMENT_CHARS = 10_000
MAX_CORRECTION_CHARS = 100_000
MAX_FLAGS = 16
MAX_IDEMPOTENCY_KEY_CHARS = 255
FLAG = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # a flag: a snake_case word
SCORE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")  # e.g. helpfulness, thumbs_up, eval/tone
MAX_CATEGORY_CHARS = 256
MAX_SOURCE_CHARS = 64
MAX_METADATA_BYTES = 16_384


@dataclass
class FeedbackInput:
    completion_id: str
    choice_index: int | None = None
    thumb: int | None = None
    rating: int | None = None
    ranking: list[int] | None = None  # choice indices, best first
    ranks: list[int] | None = None  # with ties: each listed choice's rank (0 = best, equal = tied)
    correction: str | None = None
    comment: str | None = None
    flags: list[str] = field(default_factory=list)
    idempotency_key: str | None = None
    # A named score: its key, and its value (a number, a bool, or a category's label); the data
    # type, if given, must agree with the value.
    key: str | None = None
    score: float | bool | str | None = None
    data_type: ScoreType | None = None
    metadata: dict[str, Any] | None = None
    source: str | None = None
    trace: dict[str, str] | None = None


def _kind(feedback: FeedbackInput) -> FeedbackKind:
    given = [name for name in FEEDBACK_KINDS if getattr(feedback, name) is not None]
    if len(given) != 1:
        raise InvalidRequest(
            "give exactly one of thumb, rating, ranking, correction or score (with its key)"
            + (f"; got {', '.join(given)}" if given else ""),
            param="thumb" if not given else given[1],
        )
    return given[0]


def _check_key(key: str | None) -> None:
    """The idempotency key's own checks, before any lookup: a bad key is the caller's 400."""
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(
            f"an idempotency key has 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters", param="idempotency_key"
        )
    check_key_text("idempotency_key", key)


def scored(feedback: FeedbackInput) -> tuple[str, ScoreType, float | None, str | None]:
    """A named score's (key, data type, score, category), checked: a bool is BOOLEAN (score 1.0
    or 0.0), a number NUMERIC, a string CATEGORICAL; a given data type must agree (BOOLEAN also
    takes 0 and 1)."""
    key, value, declared = feedback.key, feedback.score, feedback.data_type
    if key is None or not SCORE_KEY.match(key):
        raise InvalidRequest(
            "a score needs its key: 1 to 64 letters, digits and _ . : / - (e.g. helpfulness)", param="key"
        )
    if isinstance(value, bool) or (declared == "BOOLEAN" and value in (0, 1) and not isinstance(value, str)):
        kind: ScoreType = "BOOLEAN"
        number, category = float(bool(value)), None
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidRequest("a score must be a finite number", param="score")
        kind, number, category = "NUMERIC", float(value), None
    elif isinstance(value, str):
        if not 0 < len(value) <= MAX_CATEGORY_CHARS:
            raise InvalidRequest(f"a categorical score has 1 to {MAX_CATEGORY_CHARS} characters", param="score")
        check_text("score", value)
        kind, number, category = "CATEGORICAL", None, value
    else:
        raise InvalidRequest("a score is a number, true or false, or a category's name", param="score")
    if declared is not None and declared != kind:
        raise InvalidRequest(f"data_type {declared} does not fit the value {value!r} ({kind})", param="data_type")
    return key, kind, number, category


def _check_context(feedback: FeedbackInput) -> None:
    """Fields any kind may carry: metadata, source."""
    if feedback.metadata is not None:
        if not isinstance(feedback.metadata, dict):
            raise InvalidRequest("metadata must be a JSON object", param="metadata")
        try:
            size = len(json.dumps(feedback.metadata, allow_nan=False))
        except (ValueError, RecursionError):
            raise InvalidRequest(
                "metadata must be JSON: finite numbers, not nested too deeply", param="metadata"
            ) from None
        if size > MAX_METADATA_BYTES:
            raise InvalidRequest(f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON", param="metadata")
    if feedback.source is not None:
        if not 0 < len(feedback.source) <= MAX_SOURCE_CHARS:
            raise InvalidRequest(f"source has 1 to {MAX_SOURCE_CHARS} characters (e.g. user, model)", param="source")
        check_text("source", feedback.source)
    if feedback.data_type is not None and feedback.score is None:
        raise InvalidRequest("data_type belongs to a score", param="data_type")
    if feedback.key is not None and feedback.score is None:
        raise InvalidRequest("a key names a score: give its score (or value)", param="score")


def _check(feedback: FeedbackInput, kind: str, completion: CompletionRecord) -> None:
    n = len(completion.choices)
    if feedback.choice_index is not None and not 0 <= feedback.choice_index < n:
        raise InvalidRequest(f"choice_index must be in [0, {n}) for this completion", param="choice_index")
    if kind == "thumb" and feedback.thumb not in (1, -1):
        raise InvalidRequest(f"thumb must be 1 or -1; got {feedback.thumb}", param="thumb")
    if kind == "rating" and not (isinstance(feedback.rating, int) and 1 <= feedback.rating <= 7):
        raise InvalidRequest(f"rating must be an integer from 1 to 7; got {feedback.rating}", param="rating")
    if kind == "ranking":
        ranking = feedback.ranking or []
        if n < 2:
            raise InvalidRequest("a ranking needs a completion with n >= 2 choices", param="ranking")
        if sorted(ranking) != list(range(n)):
            raise InvalidRequest(
                f"ranking must list each of the {n} choice indices once, best first; got {ranking}", param="ranking"
            )
        if feedback.ranks is not None:
            try:
                check_ranks(feedback.ranks, n)
            except ValueError as exc:
                raise InvalidRequest(f"the ranking's ties: {exc}", param="ranking") from None
    elif feedback.ranks is not None:
        raise InvalidRequest("ranks belong to a ranking", param="ranks")
    if kind == "correction" and not (feedback.correction or "").strip():
        raise InvalidRequest("correction must not be empty", param="correction")
    if kind == "correction" and len(feedback.correction or "") > MAX_CORRECTION_CHARS:
        raise InvalidRequest(f"correction is longer than {MAX_CORRECTION_CHARS} characters", param="correction")
    if feedback.comment is not None and len(feedback.comment) > MAX_COMMENT_CHARS:
        raise InvalidRequest(f"comment is longer than {MAX_COMMENT_CHARS} characters", param="comment")
    if len(feedback.flags) > MAX_FLAGS or not all(FLAG.match(f) for f in feedback.flags):
        raise InvalidRequest(f"flags must be at most {MAX_FLAGS} snake_case words (e.g. made_up_facts)", param="flags")


class FeedbackService:
    def __init__(self, writer: EventWriter, metrics: ServiceMetrics) -> None:
        self.writer = writer
        self.metrics = metrics

    async def owned_completion(self, completion_id: str, principal: str) -> CompletionRecord:
        """The logged completion, if it exists and belongs to ``principal``."""
        record = await self.writer.read(lambda: self.writer.store.get_completion(completion_id))
        if record is None:
            several = await self.writer.read(lambda: self.writer.store.get_completion(f"{completion_id}-0"))
            if several is not None and several.principal == principal:
                raise NotFound(
                    f"{completion_id!r} answered several prompts, each logged on its own: "
                    f"{completion_id}-0 (the first prompt), {completion_id}-1, ...",
                    param="completion_id",
                    code="completion_not_found",
                )
            raise NotFound(
                f"no completion with id {completion_id!r}", param="completion_id", code="completion_not_found"
            )
        if record.principal != principal:
            raise PermissionDenied("this completion belongs to another API key", param="completion_id")
        return record

    async def _one_of_several(self, feedback: FeedbackInput, principal: str) -> FeedbackInput:
        """Feedback that names a response with several prompts (``ID``) and its choice ``i * n +
        j``, as the one completion it is about: prompt i's (``ID-i``), choice j."""
        store = self.writer.store
        first = await self.writer.read(lambda: store.get_completion(f"{feedback.completion_id}-0"))
        if first is None or first.principal != principal:
            return feedback
        if feedback.ranking is not None:
            raise InvalidRequest(
                f"a ranking is about one prompt's choices: name its completion, {feedback.completion_id}-0, -1, ...",
                param="completion_id",
            )
        index = feedback.choice_index or 0
        prompt, choice = divmod(index, len(first.choices))
        target = f"{feedback.completion_id}-{prompt}"
        if index < 0 or await self.writer.read(lambda: store.get_completion(target)) is None:
            raise InvalidRequest(f"choice_index {index} is not one of this response's choices", param="choice_index")
        return dataclasses.replace(feedback, completion_id=target, choice_index=choice)

    async def submit(self, feedback: FeedbackInput, principal: str) -> tuple[FeedbackRecord, bool]:
        """Log one feedback event; returns (the stored record, whether this call wrote it)."""
        _check_context(feedback)
        kind = _kind(feedback)
        _check_key(feedback.idempotency_key)
        key, data_type, score, category = scored(feedback) if kind == "score" else (None, None, None, None)
        try:
            completion = await self.owned_completion(feedback.completion_id, principal)
        except NotFound:  # perhaps a response to several prompts (read only when the id is not logged)
            resolved = await self._one_of_several(feedback, principal)
            if resolved is feedback:
                raise
            feedback = resolved
            completion = await self.owned_completion(feedback.completion_id, principal)
        _check(feedback, kind, completion)
        record = FeedbackRecord(
            feedback_id="fb-" + uuid.uuid4().hex,
            completion_id=feedback.completion_id,
            created=time.time(),
            principal=principal,
            kind=kind,
            choice_index=None if kind == "ranking" else (feedback.choice_index or 0),
            thumb=feedback.thumb,
            rating=feedback.rating,
            ranking=tuple(feedback.ranking) if feedback.ranking is not None else None,
            ranks=tuple(feedback.ranks) if feedback.ranks is not None and kind == "ranking" else None,
            correction=feedback.correction,
            comment=feedback.comment,
            flags=tuple(feedback.flags),
            idempotency_key=feedback.idempotency_key,
            policy_version=completion.policy_version,
            key=key,
            data_type=data_type,
            score=score,
            category=category,
            metadata=feedback.metadata,
            source=feedback.source,
            trace=feedback.trace,
        )
        try:
            stored, written = await self.writer.append_feedback(record)
        except IdempotencyConflict:
            raise Conflict(
                "this Idempotency-Key was already used with a different request body",
                param="idempotency_key",
                code="idempotency_key_reused",
            ) from None
        if written:
            self.metrics.feedback_events.labels(kind, completion.policy_version).inc()
            if kind == "thumb" and feedback.thumb is not None:
                self.metrics.record_thumb(completion.policy_version, feedback.thumb)
        return stored, not written

    async def completion_with_feedback(
        self, completion_id: str, principal: str
    ) -> tuple[CompletionRecord, list[FeedbackRecord]]:
        record = await self.owned_completion(completion_id, principal)
        feedback = await self.writer.read(lambda: self.writer.store.feedback_for(completion_id))
        return record, feedback
