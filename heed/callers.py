"""Who a caller is, and the two stable places a caller gets from a hash of it.

A caller is the end user the app named (``user``), else the API principal: the router's sticky
buckets, the trainer's held-out split and the builders all mean this by "caller".

The two hashes are deliberately different functions of one sha256 (``held_out`` reads its first
4 bytes as a fraction; ``sticky_bucket`` takes its first 8 bytes modulo 10,000), so that the two
splits are independent: with one shared number, a 5% canary would be judged only by held-out
callers (those below 20%) while stable's evidence came mostly from training callers, and the
comparison would mix the policy with the split. Both are the same on every host and replica.
"""

from __future__ import annotations

import hashlib

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
