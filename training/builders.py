"""Training data from the event log, every signal an app sends: rankings -> K-way comparisons;
thumbs -> judged answers (the reward model's pointwise loss, KTO's data) and, where one prompt got
an answer voted up and one voted down, pairs; 1-7 ratings -> rated answers and, where one prompt's
answers were rated differently, comparisons; corrections -> demonstrations and a comparison (the
corrected text over the model's answer); logged prompts -> the PPO prompt pool (deduplicated).
Named scores (``{"key": "helpfulness", "score": 0.8}``) count as thumbs or ratings where
``score_keys`` maps their key onto one (``score_as``); the others are kept in the log and counted
by key (``EventLogData.scores``, ``unused_scores``), never trained on.

One vote per (caller, completion, choice) counts, the latest (people change their minds); the
caller is the completion's end user when the app named one, else the principal that sent the
feedback. ``max_per_caller`` caps what each caller gives to each kind (their latest, in log
order), so that no one caller dominates a round's data.

Every prompt built here is a ``ServedPrompt`` that carries the token ids the completion was
served with (``CompletionRecord.prompt_token_ids``), so every stage trains on exactly the input
the policy saw (a `/v1/completions` prompt raw, a chat through the template), never on a
re-encoding of the text. Prompts are the same prompt when their served ids are the same.

Reads with ``heed.eventlog.read_after`` from a watermark, so a retraining job takes exactly the
events logged since the last one; the returned ``watermark`` is where the next job starts.
``until`` stops at a fixed log position (a job that is redone reads the same events), and a
``callers`` predicate keeps only some callers' records (the trainer holds out callers for
evaluation, as the paper held out customers and labelers).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

from heed.callers import caller_id, capped_total
from heed.eventlog import CompletionRecord, EventStore, FeedbackRecord, LogEntry, read_after
from heed.prompts import Prompt, ServedPrompt, served_prompt
from training.data import Comparison, ComparisonKind, Demonstration, Judged, Rated, write_jsonl

log = logging.getLogger(__name__)

ScoreSignal = Literal["thumb", "rating"]
# The named scores a round trains on when not told otherwise: LangSmith's and Langfuse's usual names.
DEFAULT_SCORE_KEYS: tuple[str, ...] = ("thumbs_up=thumb", "user_score=thumb", "rating=rating")


def parse_score_keys(items: Iterable[str]) -> dict[str, ScoreSignal]:
    """``key=signal`` items (signal: thumb or rating) as a mapping; raises ValueError on others."""
    mapping: dict[str, ScoreSignal] = {}
    for item in items:
        key, _, signal = item.partition("=")
        if not key.strip() or signal.strip() not in get_args(ScoreSignal):
            raise ValueError(f"a score key maps as key=thumb or key=rating; got {item!r}")
        mapping[key.strip()] = signal.strip()  # type: ignore[assignment]  # checked just above
    return mapping


def score_as(record: FeedbackRecord, signal: ScoreSignal) -> int | None:
    """A named score as the signal its key maps to: a thumb (+1 or -1) from a BOOLEAN, or from a
    NUMERIC at least 0.5 (up) or below it (down); a 1-7 rating from a NUMERIC whole number from 1
    to 7. None: the value does not fit the signal (a CATEGORICAL, a rating of 0.8)."""
    score = record.score
    if score is None or record.data_type == "CATEGORICAL":
        return None
    if signal == "thumb":
        return 1 if score >= 0.5 else -1
    if record.data_type == "NUMERIC" and score.is_integer() and 1 <= score <= 7:
        return int(score)
    return None


T = TypeVar("T")


@dataclass
class EventLogData:
    """What one pass over the log produced, and the log position it reached."""

    comparisons: list[Comparison] = field(default_factory=list)  # from rankings (K >= 2)
    pairs: list[Comparison] = field(default_factory=list)  # from thumbs: (up, down), K = 2
    demonstrations: list[Demonstration] = field(default_factory=list)  # from corrections
    judged: list[Judged] = field(default_factory=list)  # every thumb, unpaired
    ratings: list[Rated] = field(default_factory=list)  # every 1-7 rating
    rating_pairs: list[Comparison] = field(default_factory=list)  # a prompt's answers rated differently
    corrections: list[Comparison] = field(default_factory=list)  # (corrected text, the model's answer)
    prompts: list[ServedPrompt] = field(default_factory=list)  # the distinct logged prompts (by served ids)
    texts: list[str] = field(default_factory=list)  # the distinct logged answers (a ptx fallback)
    scores: Counter[str] = field(default_factory=Counter)  # named scores by key, all of them
    unused_scores: Counter[str] = field(default_factory=Counter)  # by key: not mapped, or not fitting their signal
    # (kind, caller) -> what the caller gave of each kind (rankings, thumbs, ratings, corrections)
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Completions served with tools, and the feedback on them: skipped (see ``uses_tools``).
    tool_completions: int = 0
    tool_feedback: int = 0
    watermark: int = 0

    def ranked(self) -> list[Comparison]:
        """Every comparison, whatever signal it came from (``Comparison.kind`` says which)."""
        return self.comparisons + self.pairs + self.rating_pairs + self.corrections

    def reward_examples(self) -> list[Comparison | Judged | Rated]:
        """What the reward model trains on: every comparison, thumb and rating."""
        return [*self.ranked(), *self.judged, *self.ratings]

    def counts(self) -> dict[str, int]:
        return {
            "rankings": len(self.comparisons),
            "thumbs": len(self.judged),
            "thumb_pairs": len(self.pairs),
            "ratings": len(self.ratings),
            "rating_pairs": len(self.rating_pairs),
            "corrections": len(self.corrections),
            "demonstrations": len(self.demonstrations),
            "prompts": len(self.prompts),
            "scores": sum(self.scores.values()),
            "scores_unused": sum(self.unused_scores.values()),
            "skipped_tool_completions": self.tool_completions,
            "skipped_tool_feedback": self.tool_feedback,
        }


def uses_tools(record: CompletionRecord) -> bool:
    """Whether a completion was served with tools. Such conversations are skipped, with their
    feedback, and counted: a forced call's answer was held to a grammar that PPO's rollouts do
    not reproduce, and an answer under "auto" was judged against tools that a template without
    tool support never showed the policy."""
    return bool(record.params.get("tools"))


def completion_caller(record: CompletionRecord) -> str:
    """Who a completion was for: the end user the app named (``user``) when its key may name
    users, else the API principal (``CompletionRecord.evidence_caller``)."""
    return record.evidence_caller


def feedback_caller(source: CompletionRecord, record: FeedbackRecord) -> str:
    """Whose feedback this is: the completion's end user when its key may name users, else the
    principal that sent the feedback (the completion's owner: no other may send it)."""
    return source.caller or caller_id(source.user, record.principal)


def _key(prompt: Prompt) -> tuple[int, ...]:
    """Two prompts are one when the model saw the same ids (the same text sent twice; not the
    same text sent raw and as a chat, which the model saw differently). Every prompt built here
    is a ServedPrompt."""
    return prompt.token_ids or () if isinstance(prompt, ServedPrompt) else ()


def _choice_text(record: CompletionRecord, index: int | None) -> str | None:
    for choice in record.choices:
        if choice.index == (index or 0):
            return choice.text
    return None


def fair_limit(counts: Iterable[int], share: float) -> int | None:
    """The most items of a pool one caller may give (None: no limit) so that no caller gives more
    than ``share`` of what is kept: ``share`` times ``capped_total`` of the callers' counts. No
    limit with fewer than 1 / ``share`` callers: a pool that small cannot be shared out (equal
    parts would starve it: thumbs of 40 and 1 would keep 2), and the per-caller cap alone holds."""
    have = [n for n in counts if n > 0]
    if share >= 1 or len(have) * share <= 1:
        return None
    return math.floor(share * capped_total(have, share) + 1e-9)


def _capped(
    items: Iterable[tuple[str, T]],
    cap: int,
    kind: str | None = None,
    sent: Counter[tuple[str, str]] | None = None,
    share: float = 1.0,
) -> list[T]:
    """The items (caller, item) in order, only the last ``cap`` of each caller's (0: all): a
    caller's newest feedback counts, and their older feedback rotates out. Then no caller above
    ``share`` of what is kept (``fair_limit``), their latest again. With ``sent``, counts what
    each caller gave of ``kind`` there."""
    items = list(items)
    left = Counter(caller for caller, _ in items)  # each caller's items not yet passed
    limits = [n if cap <= 0 else min(n, cap) for n in left.values()]
    # the smaller of the two limits that apply (0: neither does)
    cap = min([n for n in (cap if cap > 0 else None, fair_limit(limits, share)) if n is not None], default=0)
    kept = []
    for caller, item in items:
        if cap <= 0 or left[caller] <= cap:
            kept.append(item)
            if sent is not None and kind is not None:
                sent[(kind, caller)] += 1
        left[caller] -= 1
    return kept


def build_from_event_log(
    store: EventStore,
    watermark: int = 0,
    *,
    until: int | None = None,
    callers: Callable[[str], bool] | None = None,
    entries: Iterable[LogEntry] | None = None,
    max_per_caller: int = 0,
    score_keys: dict[str, ScoreSignal] | None = None,
    max_caller_share: float = 1.0,
    find_completion: Callable[[str], CompletionRecord | None] | None = None,
) -> EventLogData:
    """Every training record derivable from the events after ``watermark`` (up to and including
    ``until``); with ``callers``, only the records of callers for which it is true (a
    completion's caller is ``completion_caller``, a feedback's is ``feedback_caller``);
    ``max_per_caller``: at most this many records of each kind from one caller (0: no cap).
    ``entries``: log entries already read, instead of reading the store again (several views of
    one stretch of the log cost one read). ``score_keys``: which named scores count as thumbs or
    ratings (default: ``DEFAULT_SCORE_KEYS``). ``max_caller_share``: no caller gives more than this
    share of any kind (``fair_limit``), the prompts and the logged answers included. Feedback on a
    completion logged at or before ``watermark`` finds it with ``find_completion`` (default: the
    store's ``get_completion``)."""
    score_keys = parse_score_keys(DEFAULT_SCORE_KEYS) if score_keys is None else score_keys
    data = EventLogData(watermark=watermark)
    completions: dict[str, CompletionRecord] = {}
    answered: list[tuple[str, str]] = []  # (caller, an answer's text), as served
    asked: list[tuple[str, ServedPrompt]] = []  # (caller, a prompt), as asked
    # One vote per (caller, completion, choice): the latest counts (a dict keeps the first's place).
    Vote = tuple[str, str, int]
    thumbs: dict[Vote, int] = {}
    ratings: dict[Vote, int] = {}
    corrections: dict[Vote, str] = {}
    ranked: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}  # (ranking, ranks)

    def completion(completion_id: str) -> CompletionRecord | None:
        if completion_id not in completions:  # feedback on a completion logged before the watermark
            found = (find_completion or store.get_completion)(completion_id)
            if found is None:
                return None
            completions[completion_id] = found
        return completions[completion_id]

    for entry in read_after(store, watermark) if entries is None else entries:
        if until is not None and entry.seq > until:
            break
        data.watermark = entry.seq
        record = entry.record
        if isinstance(record, CompletionRecord):
            completions[record.completion_id] = record
            if callers is not None and not callers(completion_caller(record)):
                continue
            if uses_tools(record):
                data.tool_completions += 1
                continue
            who = completion_caller(record)
            answered.extend((who, answer.text) for answer in record.choices if answer.text.strip())
            asked.append((who, served_prompt(record)))
            continue
        assert isinstance(record, FeedbackRecord)
        source = completion(record.completion_id)
        if source is None:
            log.warning("feedback %s is on an unknown completion %s", record.feedback_id, record.completion_id)
            continue
        who = feedback_caller(source, record)
        if callers is not None and not callers(who):
            continue
        if uses_tools(source):
            data.tool_feedback += 1
            continue
        vote = (who, record.completion_id, record.choice_index or 0)
        if record.kind == "score" and record.key is not None:
            data.scores[record.key] += 1
            signal = score_keys.get(record.key)
            value = score_as(record, signal) if signal is not None else None
            if value is None:
                data.unused_scores[record.key] += 1
            elif signal == "thumb":
                thumbs[vote] = value  # one vote per caller and choice, whichever way it came
            else:
                ratings[vote] = value
        elif record.kind == "ranking" and record.ranking is not None:
            ranks = record.ranks if record.ranks is not None else tuple(range(len(record.ranking)))
            ranked[(who, record.completion_id)] = (tuple(record.ranking), tuple(ranks))
        elif record.kind == "thumb" and record.thumb in (1, -1):
            thumbs[vote] = record.thumb
        elif record.kind == "rating" and record.rating is not None:
            ratings[vote] = record.rating
        elif record.kind == "correction" and record.correction and record.correction.strip():
            corrections[vote] = record.correction

    # The prompts PPO and the gate's win rate sample, and the logged answers (the ptx mix when
    # there is no pretraining text): each caller's latest, so that no caller fills the pools.
    share = max_caller_share
    data.texts = list(dict.fromkeys(_capped(answered, max_per_caller, share=share)))
    by_ids: dict[tuple[int, ...], ServedPrompt] = {}
    for prompt in _capped(asked, max_per_caller, share=share):
        if _key(prompt):
            by_ids.setdefault(_key(prompt), prompt)
    data.prompts = list(by_ids.values())

    rankings: list[tuple[str, Comparison]] = []
    for (who, completion_id), (ranking, ranks) in ranked.items():
        source = completions[completion_id]
        texts = [_choice_text(source, i) for i in ranking]
        if len(texts) < 2 or any(t is None for t in texts) or len(set(ranking)) != len(ranking):
            log.warning("skipping a ranking of %s that does not name its choices", completion_id)
            continue
        # An empty answer can't be scored as a response: rank the others in the same order.
        kept = [(t, r) for t, r in zip(texts, ranks, strict=True) if t]
        distinct = sorted({r for _, r in kept})
        if len(distinct) >= 2:  # at least one answer above another
            dense = tuple(distinct.index(r) for _, r in kept)
            strict = dense == tuple(range(len(kept)))
            comparison = Comparison(served_prompt(source), tuple(t for t, _ in kept), None if strict else dense)
            rankings.append((who, comparison))
    data.comparisons = _capped(rankings, max_per_caller, "rankings", data.sent, share)

    # Thumbs: each one judged on its own; an answer voted up and one voted down for the same prompt: a pair.
    judged = [
        (who, Judged(served_prompt(completions[cid]), text, thumb == 1))
        for (who, cid, choice), thumb in thumbs.items()
        if (text := _choice_text(completions[cid], choice))
    ]
    data.judged = _capped(judged, max_per_caller, "thumbs", data.sent, share)
    data.pairs = _pairs_of([(j.prompt, j.response, 1 if j.desirable else -1) for j in data.judged], "thumbs")

    # Ratings: each one rated on its own; a prompt's answers rated differently: a comparison.
    rated = [
        (who, Rated(served_prompt(completions[cid]), text, rating))
        for (who, cid, choice), rating in ratings.items()
        if (text := _choice_text(completions[cid], choice))
    ]
    data.ratings = _capped(rated, max_per_caller, "ratings", data.sent, share)
    data.rating_pairs = _pairs_of([(r.prompt, r.response, r.rating) for r in data.ratings], "rating")

    # Corrections: the corrected text is a demonstration, and better than the model's answer.
    fixes: list[tuple[str, tuple[str, ServedPrompt, str, str | None]]] = [
        (who, (who, served_prompt(completions[cid]), text, _choice_text(completions[cid], choice)))
        for (who, cid, choice), text in corrections.items()
    ]
    for who, prompt, text, original in _capped(fixes, max_per_caller, share=share):  # sent: the corrections below
        data.demonstrations.append(Demonstration(prompt, text))
        if original and original.strip() and original.strip() != text.strip():
            data.corrections.append(Comparison(prompt, (text, original), kind="correction"))
            data.sent[("corrections", who)] += 1
    return data


MAX_RATED_K = 4  # answers in one comparison made of ratings (a ranking's K is the request's n)


def _pairs_of(votes: list[tuple[Prompt, str, int]], kind: ComparisonKind) -> list[Comparison]:
    """A prompt's answers judged differently (by thumb or rating) as comparisons, best first (an
    answer judged more than once: its mean), equal ones tied: thumbs as (up, down) pairs, ratings
    as comparisons of at most MAX_RATED_K answers."""
    by_prompt: dict[tuple[int, ...], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[tuple[int, ...], Prompt] = {}
    for prompt, text, score in votes:
        by_prompt[_key(prompt)][text].append(score)
        prompts.setdefault(_key(prompt), prompt)
    out = []
    for key, answers in by_prompt.items():
        means = sorted(((sum(v) / len(v), text) for text, v in answers.items()), key=lambda m: -m[0])
        levels = sorted({m for m, _ in means}, reverse=True)
        if len(levels) < 2:
            continue
        if kind == "thumbs":  # (up, down) pairs, K = 2: each answer in one at least, max(ups, downs) pairs
            ups = [t for m, t in means if m > 0]  # (every up x down pair was quadratic: a popular prompt
            downs = [t for m, t in means if m < 0]  # with 2,000 ups and 1,000 downs made 2 million)
            count = max(len(ups), len(downs)) if ups and downs else 0
            out += [
                Comparison(prompts[key], (ups[i % len(ups)], downs[i % len(downs)]), kind=kind) for i in range(count)
            ]
            continue
        # Ratings: at most MAX_RATED_K answers a comparison (the reward model scores a comparison's
        # answers in one batch: a prompt rated hundreds of times made one comparison of hundreds);
        # each answer in one at least, each comparison across the range (every groups-th answer).
        # A group whose answers are all rated alike is compared, 3 at a time, with the answer rated
        # furthest from them (it is then in more than one).
        groups = -(-len(means) // MAX_RATED_K)
        parts = []
        for part in (means[g::groups] for g in range(groups)):
            if len({m for m, _ in part}) > 1:
                parts.append(part)
                continue
            far = means[-1] if part[0][0] == means[0][0] else means[0]
            step = MAX_RATED_K - 1
            parts += [sorted([*part[i : i + step], far], key=lambda m: -m[0]) for i in range(0, len(part), step)]
        for part in parts:
            part_levels = sorted({m for m, _ in part}, reverse=True)
            ranks = tuple(part_levels.index(m) for m, _ in part)
            strict = ranks == tuple(range(len(part)))
            out.append(Comparison(prompts[key], tuple(t for _, t in part), None if strict else ranks, kind))
    return out


def export(data: EventLogData, out: Path) -> dict[str, int]:
    """Write the data set as JSONL files in ``out`` (comparisons.jsonl holds every comparison, each
    with its kind: rankings, thumb pairs, rating pairs, corrections)."""
    counts = {
        "comparisons": write_jsonl(out / "comparisons.jsonl", data.ranked()),
        "demonstrations": write_jsonl(out / "demonstrations.jsonl", data.demonstrations),
        "judged": write_jsonl(out / "judged.jsonl", data.judged),
        "ratings": write_jsonl(out / "ratings.jsonl", data.ratings),
        "prompts": write_jsonl(out / "prompts.jsonl", data.prompts),
    }
    (out / "watermark.json").write_text(json.dumps({"watermark": data.watermark, **counts}))
    return counts
