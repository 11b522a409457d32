"""When each request is sent: all at once, or a seeded Poisson or gamma arrival process.

As in vLLM, the gaps between requests are gamma distributed with shape k (`burstiness`) and
scale 1/(rate*k): the mean gap is 1/rate whatever k is, and the coefficient of variation is
1/sqrt(k). k=1 is a Poisson process (exponential gaps); k<1 bunches requests into bursts with
lulls between them; k>1 spaces them more evenly than Poisson.
"""

from __future__ import annotations

import math

import numpy as np


def parse_rate(text: str | float) -> float:
    """A request rate in requests per second: a positive number, or inf (everything at t=0)."""
    try:
        rate = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"request rate must be a number or inf, got {text!r}") from None
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {text!r}")
    return rate


def rate_text(rate: float) -> str:
    """How a rate is written in labels and file names: 4, 0.5, inf."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """`n` gaps in seconds between successive requests; all zero for an infinite rate."""
    if n < 0:
        raise ValueError("the number of gaps must be >= 0")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n).tolist()


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start of the run: the first request goes at 0, each
    next one a gap after the one before. The runner schedules against these absolute offsets
    (not a sleep per gap), so time spent sending never stretches the schedule."""
    gaps = arrival_gaps(max(n - 1, 0), rate, burstiness, seed)
    return [0.0, *np.cumsum(gaps).tolist()][:n]
