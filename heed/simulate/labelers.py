"""Simulated labelers: each has a stated hidden preference, a weight on every instruction kind
(how much it matters to them that an answer follows that kind of instruction), plus noise.
Their utility for an answer is the weighted share of its prompt's instructions it follows.
They give thumbs and 1-7 ratings, rank K answers (tying answers they cannot tell apart), write
corrections and, when held out, judge two answers side by side."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from heed.simulate.instructions import KINDS, Task

# A check of an answer beyond the prompt's own instructions (used by the tiny-model test, whose
# random policy cannot read instructions): name -> (task, answer) -> followed.
ExtraCheck = Callable[[Task, str], bool]


@dataclass(frozen=True)
class Labeler:
    name: str
    group: str  # "train" (gives the feedback) or "heldout" (only judges)
    weights: dict[str, float]  # instruction kind (or extra check) -> how much it matters
    noise: float  # standard deviation of the noise on each judgement of an answer
    tie_margin: float = 0.1  # answers whose noisy utilities differ by less are tied

    def utility(self, task: Task, answer: str, extra: dict[str, ExtraCheck] | None = None) -> float:
        """The weighted share of the prompt's instructions (and extra checks) the answer follows."""
        if not answer.strip():
            return 0.0
        checks = [(i.kind, i(answer)) for i in task.instructions]
        checks += [(name, check(task, answer)) for name, check in (extra or {}).items()]
        total = sum(self.weights.get(kind, 1.0) for kind, _ in checks)
        return sum(self.weights.get(kind, 1.0) for kind, ok in checks if ok) / total if total else 0.0

    def judge(self, task: Task, answer: str, rng: random.Random, extra: dict[str, ExtraCheck] | None = None) -> float:
        return self.utility(task, answer, extra) + rng.gauss(0.0, self.noise)

    def thumb(self, task: Task, answer: str, rng: random.Random, extra: dict[str, ExtraCheck] | None = None) -> int:
        return 1 if self.judge(task, answer, rng, extra) >= 0.5 else -1

    def rate(self, task: Task, answer: str, rng: random.Random, extra: dict[str, ExtraCheck] | None = None) -> int:
        """A 1-7 rating: the noisy utility (0-1) on the scale."""
        return 1 + round(6 * min(max(self.judge(task, answer, rng, extra), 0.0), 1.0))

    def rank(
        self, task: Task, answers: Sequence[str], rng: random.Random, extra: dict[str, ExtraCheck] | None = None
    ) -> list[int | list[int]] | None:
        """Choice indices best first; answers within ``tie_margin`` of the one above are tied
        (as the feedback API takes it: a list inside is a tie). None when all are alike."""
        scores = sorted(((self.judge(task, a, rng, extra), i) for i, a in enumerate(answers)), reverse=True)
        groups: list[list[int]] = []
        last = None
        for score, index in scores:
            if last is not None and last - score < self.tie_margin:
                groups[-1].append(index)
            else:
                groups.append([index])
                last = score
        if len(groups) == 1:  # all alike: there is no ranking to give (the API refuses all-tied)
            return None
        return [g[0] if len(g) == 1 else sorted(g) for g in groups]

    def compare(
        self, task: Task, first: str, second: str, rng: random.Random, extra: dict[str, ExtraCheck] | None = None
    ) -> float:
        """1 if ``first`` is better, 0 if ``second`` is, 0.5 for a tie."""
        a, b = self.judge(task, first, rng, extra), self.judge(task, second, rng, extra)
        return 0.5 if abs(a - b) < self.tie_margin else float(a > b)

    def describe(self) -> str:
        cares = sorted(self.weights.items(), key=lambda kv: -kv[1])
        return (
            f"{self.name} ({self.group}): " + ", ".join(f"{k} {w:.2f}" for k, w in cares) + f"; noise {self.noise:.2f}"
        )


def population(
    train: int,
    heldout: int,
    seed: int,
    kinds: Sequence[str] | None = None,
    noise: tuple[float, float] = (0.05, 0.15),
    tie_margin: float = 0.3,
) -> list[Labeler]:
    """Labelers who all care about instructions being followed, each weighting the kinds
    differently (log-normal around 1) and judging with their own amount of noise. They tie answers
    whose noisy utilities are within ``tie_margin``: with noise of 0.1-0.3 and a margin of 0.1,
    59% of the ranked pairs were between answers that followed the same instructions (pure noise),
    and a reward model reached 0.55 on them; at 0.05-0.15 and 0.3, 24% and 0.78 (docs/results.md)."""
    rng = random.Random(seed)
    people = []
    for i in range(train + heldout):
        weights = {k: round(rng.lognormvariate(0.0, 0.4), 3) for k in (kinds or KINDS)}
        group = "train" if i < train else "heldout"
        people.append(Labeler(f"{group}-{i:02d}", group, weights, round(rng.uniform(*noise), 3), tie_margin))
    return people
