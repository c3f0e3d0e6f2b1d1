"""Who a caller is, and the two stable places a caller gets from a hash of it.

A caller is the end user the app named (``user``), else the API principal: the router's sticky
buckets, the trainer's held-out split and the builders all mean this by "caller".

The two hashes are deliberately different functions of one sha256 (``held_out`` reads its first
4 bytes as a fraction; ``sticky_bucket`` takes its first 8 bytes modulo 10,000), so that the two
splits are independent: with one shared number, a 5% canary would be judged only by held-out
callers (those below 20%) while stable's evidence came mostly from training callers, and the
comparison would mix the policy with the split. Both are the same on every host and replica.

``capped_total`` is how much evidence callers' amounts make when no caller may carry more than a
share of it: the rollout controller weighs thumbs with it, the trainer its round threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

BUCKETS = 10_000


def caller_id(user: str | None, principal: str) -> str:
    """The caller of a request or of an event: the app's end user when it named one, else the principal."""
    return user or principal


def _digest(caller: str) -> bytes:
    return hashlib.sha256(caller.encode()).digest()


def held_out(caller: str, fraction: float) -> bool:
    """Whether ``caller``'s events are kept for evaluation (the trainer's caller split)."""
    return int.from_bytes(_digest(caller)[:4], "big") / 2**32 < fraction


def sticky_bucket(caller: str) -> int:
    """The caller's place in 0..9999 for canary routing: a caller stays on one side while the share grows."""
    return int.from_bytes(_digest(caller)[:8], "big") % BUCKETS


def capped_total(amounts: Iterable[float], max_share: float) -> float:
    """The most evidence ``amounts`` (one per caller) make with no caller above ``max_share`` of it:
    the largest total T with sum over callers of min(n_c, max_share * T) = T. Callers under the cap
    count whole, the others max_share * T each. Fewer than 1 / max_share callers make 0 (one caller
    alone always does, below a share of 1); a share of 1 or more: the plain sum."""
    counts = sorted((n for n in amounts if n > 0), reverse=True)
    if max_share >= 1:
        return float(sum(counts))
    rest = float(sum(counts))  # the amounts of the callers not capped: all but the m largest
    for m in range(len(counts) + 1):  # the m largest capped: T = rest / (1 - m * share), if consistent
        if m * max_share >= 1:
            break
        if m:
            rest -= counts[m - 1]
        total = rest / (1 - m * max_share)
        cap = max_share * total
        if (m == 0 or counts[m - 1] >= cap) and (m == len(counts) or counts[m] <= cap):
            return total
    return 0.0
