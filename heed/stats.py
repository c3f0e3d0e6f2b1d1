"""Small statistics both halves use: the Wilson score interval of a rate."""

from __future__ import annotations

import math


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a rate, ``successes`` of ``trials`` (sound at small counts,
    unlike the normal one; z 1.96: 95% two-sided). ``successes`` may be fractional (a rate
    measured otherwise, times the count it is taken as). None without trials."""
    if trials <= 0:
        return None
    p = min(max(successes / trials, 0.0), 1.0)
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)
