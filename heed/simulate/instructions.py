"""Prompts that carry explicit, checkable instructions: a topic and one or two instructions
(length limits, case, required or forbidden words, formats), each with a check a program can
run on an answer. The simulated labelers' hidden preferences are built on these checks."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TOPICS = [
    "the sea", "a rainy day", "your favourite fruit", "the moon", "a busy city", "mountains", "coffee",
    "a good book", "winter", "a small dog", "the train station", "bread", "the night sky", "a garden",
    "football", "the desert", "a school day", "music", "the forest", "an old house", "rivers", "cats",
    "the market", "snow", "a bicycle", "the kitchen", "birds", "summer holidays", "a library", "tea",
]  # fmt: skip
ASKS = ["Tell me about {topic}.", "Describe {topic}.", "Write a few words about {topic}.", "What is {topic} like?"]
WORDS = ["blue", "quiet", "warm", "bright", "old", "happy"]
FORBIDDEN = ["the", "is", "and", "a"]
MAX_WORDS = [5, 8, 12]


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text)


@dataclass(frozen=True)
class Instruction:
    """One checkable instruction: ``kind`` names the family (the unit of the report's table)."""

    kind: str
    text: str
    check: Callable[[str], bool]

    def __call__(self, answer: str) -> bool:
        return bool(answer.strip()) and self.check(answer)


def max_words(n: int) -> Instruction:
    return Instruction("max_words", f"Answer in at most {n} words.", lambda a: len(words(a)) <= n)


def lowercase() -> Instruction:
    return Instruction(
        "lowercase", "Use only lowercase letters.", lambda a: a == a.lower() and any(c.isalpha() for c in a)
    )


def uppercase() -> Instruction:
    return Instruction(
        "uppercase",
        "WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS.",
        lambda a: a == a.upper() and any(c.isalpha() for c in a),
    )


def include_word(word: str) -> Instruction:
    return Instruction(
        "include_word", f'Use the word "{word}" in your answer.', lambda a: word in (w.lower() for w in words(a))
    )


def forbid_word(word: str) -> Instruction:
    return Instruction(
        "forbid_word", f'Do not use the word "{word}".', lambda a: word not in (w.lower() for w in words(a))
    )


def bullet_list() -> Instruction:
    def check(answer: str) -> bool:
        lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
        return len(lines) >= 2 and all(line.startswith(("-", "*", "•")) for line in lines)

    return Instruction("bullet_list", 'Answer as a list: each item on its own line, starting with "- ".', check)


def one_sentence() -> Instruction:
    return Instruction(
        "one_sentence",
        "Answer in exactly one sentence.",
        lambda a: len([s for s in re.split(r"[.!?]+", a.strip()) if s.strip()]) == 1,
    )


KINDS: dict[str, Callable[[random.Random], Instruction]] = {
    "max_words": lambda rng: max_words(rng.choice(MAX_WORDS)),
    "lowercase": lambda rng: lowercase(),
    "uppercase": lambda rng: uppercase(),
    "include_word": lambda rng: include_word(rng.choice(WORDS)),
    "forbid_word": lambda rng: forbid_word(rng.choice(FORBIDDEN)),
    "bullet_list": lambda rng: bullet_list(),
    "one_sentence": lambda rng: one_sentence(),
}
# The kinds a prompt carries by default: those the bundled SmolLM2-135M-Instruct follows in 20-80%
# of its samples (800 prompts x 4 samples, docs/results.md), so that its own answers hold something
# to learn from. It almost never writes lists, all-lowercase or all-capitals (1-5%): rankings of
# four answers that all fail are noise to a reward model, and PPO cannot find what it never samples.
DEFAULT_KINDS = ("max_words", "include_word", "forbid_word", "one_sentence")
CONFLICTS = {frozenset({"lowercase", "uppercase"}), frozenset({"bullet_list", "one_sentence"})}


@dataclass(frozen=True)
class Task:
    """A prompt and the instructions it carries (the prompt's text states them)."""

    prompt: str
    instructions: tuple[Instruction, ...]

    def followed(self, answer: str) -> dict[str, bool]:
        return {i.kind: i(answer) for i in self.instructions}

    def required_words(self) -> list[str]:
        """The words the task's include_word instructions ask for (none: it has no such instruction)."""
        return [w for w in WORDS if any(i.kind == "include_word" and f'"{w}"' in i.text for i in self.instructions)]


def make_task(rng: random.Random, kinds: Sequence[str] | None = None) -> Task:
    """A topic question with one or two instructions of different, compatible kinds."""
    pool = kinds or list(KINDS)
    first = rng.choice(pool)
    chosen = [first]
    if rng.random() < 0.5:
        others = [k for k in pool if k != first and frozenset({first, k}) not in CONFLICTS]
        if others:
            chosen.append(rng.choice(others))
    instructions = tuple(KINDS[k](rng) for k in chosen)
    ask = rng.choice(ASKS).format(topic=rng.choice(TOPICS))
    return Task(" ".join([ask, *(i.text for i in instructions)]), instructions)


# How many different instructions of each kind make_task can draw (its texts differ).
VARIANTS = {
    "max_words": len(MAX_WORDS), "lowercase": 1, "uppercase": 1, "include_word": len(WORDS),
    "forbid_word": len(FORBIDDEN), "bullet_list": 1, "one_sentence": 1,
}  # fmt: skip


def prompt_space(kinds: Sequence[str] | None = None) -> int:
    """How many distinct prompts make_task can write with ``kinds``: each ask of each topic with
    one instruction, or two of different, compatible kinds (in either order)."""
    pool = list(kinds or KINDS)
    single = sum(VARIANTS[k] for k in pool)
    double = sum(VARIANTS[a] * VARIANTS[b] for a in pool for b in pool if a != b and frozenset({a, b}) not in CONFLICTS)
    return len(TOPICS) * len(ASKS) * (single + double)


# Filler for a simulated user's own answer: none of it is a forbidden or an include_word word.
FILLER = ["soft", "light", "calm", "green", "hills", "morning", "slow", "clear", "river", "stone", "wind", "tall"]


def write_answer(task: Task, rng: random.Random) -> str | None:
    """An answer a user writes to correct the model's: a few words that follow every instruction
    of the task (None when none of the tries does)."""
    required = task.required_words()
    kinds = {i.kind for i in task.instructions}
    for size in (4, 3, 6, 2):
        words = required + rng.sample(FILLER, max(size - len(required), 0))
        rng.shuffle(words)
        bullets = "\n".join(f"- {w}" for w in words)
        text = bullets if "bullet_list" in kinds else " ".join(words).capitalize() + "."
        text = text.lower() if "lowercase" in kinds else text.upper() if "uppercase" in kinds else text
        if all(task.followed(text).values()):
            return text
    return None


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """``kinds`` as a list, or ValueError naming the unknown ones."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown instruction kinds {unknown}; choose from {', '.join(KINDS)}")
    return list(kinds)


def make_tasks(count: int, seed: int, kinds: Sequence[str] | None = None) -> list[Task]:
    rng = random.Random(seed)
    kinds = check_kinds(kinds) if kinds is not None else None
    return [make_task(rng, kinds) for _ in range(count)]
