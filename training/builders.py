"""Training data from the event log: rankings -> K-way comparisons, thumbs -> pairs, corrected
answers -> demonstrations, logged prompts -> the PPO prompt pool (deduplicated).

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
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from heed.callers import caller_id
from heed.eventlog import CompletionRecord, EventStore, FeedbackRecord, LogEntry, read_after
from heed.prompts import ServedPrompt, served_prompt
from training.data import Comparison, Demonstration, Judged, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class EventLogData:
    """What one pass over the log produced, and the log position it reached."""

    comparisons: list[Comparison] = field(default_factory=list)  # from rankings (K >= 2)
    pairs: list[Comparison] = field(default_factory=list)  # from thumbs: (up, down), K = 2
    demonstrations: list[Demonstration] = field(default_factory=list)  # from corrections
    judged: list[Judged] = field(default_factory=list)  # every thumb, unpaired (KTO's data)
    prompts: list[ServedPrompt] = field(default_factory=list)  # every distinct logged prompt (by served ids)
    texts: list[str] = field(default_factory=list)  # every distinct logged answer (a ptx fallback)
    watermark: int = 0


def completion_caller(record: CompletionRecord) -> str:
    """Who a completion was for: the end user the app named (``user``), else the API principal."""
    return caller_id(record.user, record.principal)


def feedback_caller(source: CompletionRecord, record: FeedbackRecord) -> str:
    """Whose feedback this is: the completion's end user when the app named one, else the
    principal that sent the feedback."""
    return caller_id(source.user, record.principal)


def _key(prompt: ServedPrompt) -> tuple[int, ...]:
    """Two prompts are one when the model saw the same ids (the same text sent twice; not the
    same text sent raw and as a chat, which the model saw differently)."""
    return prompt.token_ids or ()


def _choice_text(record: CompletionRecord, index: int | None) -> str | None:
    for choice in record.choices:
        if choice.index == (index or 0):
            return choice.text
    return None


def build_from_event_log(
    store: EventStore,
    watermark: int = 0,
    *,
    until: int | None = None,
    callers: Callable[[str], bool] | None = None,
    entries: Iterable[LogEntry] | None = None,
) -> EventLogData:
    """Every training record derivable from the events after ``watermark`` (up to and including
    ``until``); with ``callers``, only the records of callers for which it is true (a
    completion's caller is ``completion_caller``, a feedback's is ``feedback_caller``).
    ``entries``: log entries already read, instead of reading the store again (several views of
    one stretch of the log cost one read)."""
    data = EventLogData(watermark=watermark)
    seen_texts: set[str] = set()
    completions: dict[str, CompletionRecord] = {}
    seen_prompts: set[tuple[int, ...]] = set()
    # The latest thumb of each (principal, completion, choice) counts: people change their minds.
    thumbs: dict[tuple[str, str, int], tuple[str, int]] = {}
    ranked: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}  # (ranking, ranks)

    def completion(completion_id: str) -> CompletionRecord | None:
        if completion_id not in completions:  # feedback on a completion logged before the watermark
            found = store.get_completion(completion_id)
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
            for answer in record.choices:
                if answer.text.strip() and answer.text not in seen_texts:
                    seen_texts.add(answer.text)
                    data.texts.append(answer.text)
            prompt = served_prompt(record)
            if _key(prompt) and _key(prompt) not in seen_prompts:
                seen_prompts.add(_key(prompt))
                data.prompts.append(prompt)
            continue
        assert isinstance(record, FeedbackRecord)
        source = completion(record.completion_id)
        if source is None:
            log.warning("feedback %s is on an unknown completion %s", record.feedback_id, record.completion_id)
            continue
        if callers is not None and not callers(feedback_caller(source, record)):
            continue
        if record.kind == "ranking" and record.ranking is not None:
            ranks = record.ranks if record.ranks is not None else tuple(range(len(record.ranking)))
            ranked[(record.principal, record.completion_id)] = (tuple(record.ranking), tuple(ranks))
        elif record.kind == "thumb" and record.thumb in (1, -1):
            thumbs[(record.principal, record.completion_id, record.choice_index or 0)] = (
                record.completion_id,
                record.thumb,
            )
        elif record.kind == "correction" and record.correction and record.correction.strip():
            data.demonstrations.append(Demonstration(served_prompt(source), record.correction))

    for (_, completion_id), (ranking, ranks) in ranked.items():
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
            data.comparisons.append(
                Comparison(served_prompt(source), tuple(t for t, _ in kept), None if strict else dense)
            )

    # Thumbs -> pairs: an answer voted up and one voted down for the same prompt.
    by_prompt: dict[tuple[int, ...], dict[int, list[str]]] = defaultdict(lambda: {1: [], -1: []})
    prompts: dict[tuple[int, ...], ServedPrompt] = {}
    for (_, _, choice), (completion_id, thumb) in thumbs.items():
        source = completions[completion_id]
        text = _choice_text(source, choice)
        prompt = served_prompt(source)
        if not text:
            continue
        data.judged.append(Judged(prompt, text, thumb == 1))  # one per voter and choice: the latest
        if text in by_prompt[_key(prompt)][thumb]:  # already counted for this prompt
            continue
        by_prompt[_key(prompt)][thumb].append(text)
        prompts.setdefault(_key(prompt), prompt)
    for key, votes in by_prompt.items():
        for up in votes[1]:
            for down in votes[-1]:
                if up != down:
                    data.pairs.append(Comparison(prompts[key], (up, down)))
    return data


def export(data: EventLogData, out: Path) -> dict[str, int]:
    """Write the data set as JSONL files in ``out`` (comparisons.jsonl holds rankings and pairs)."""
    counts = {
        "comparisons": write_jsonl(out / "comparisons.jsonl", data.comparisons + data.pairs),
        "demonstrations": write_jsonl(out / "demonstrations.jsonl", data.demonstrations),
        "judged": write_jsonl(out / "judged.jsonl", data.judged),
        "prompts": write_jsonl(out / "prompts.jsonl", data.prompts),
    }
    (out / "watermark.json").write_text(json.dumps({"watermark": data.watermark, **counts}))
    return counts
