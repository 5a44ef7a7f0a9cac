"""Request arrival times: all at once, Poisson, or gamma-distributed gaps (burstiness). No torch.

As in `vllm bench serve`: at rate r and burstiness b the gaps are Gamma(shape=b, scale=1/(r*b)),
so the mean gap is 1/r for every b; b = 1 is a Poisson process, b < 1 burstier, b > 1 smoother.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start, non-decreasing, the first one 0.

    `request_rate` is requests per second; `math.inf` sends everything at time 0.
    Raises ValueError on a non-positive rate or burstiness.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = all at once), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if num_requests == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness),
                     size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
