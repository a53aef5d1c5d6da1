"""Confidence intervals for the judge's and the policies' figures (small samples: 50-200 pairs).

* ``wilson_interval(k, n)``: a binomial proportion (accuracy, agreement, share kept). Wilson's
  score interval (E. B. Wilson, JASA 1927) stays inside [0, 1] and keeps its coverage near
  k = 0 or k = n, where the normal approximation p +- z sqrt(p(1-p)/n) collapses to a point:

      centre = (p + z^2 / 2n) / (1 + z^2 / n)
      half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

* ``mean_interval(xs)``: the mean of bounded per-item scores (a win rate with ties counted as
  1/2: scores in {0, 1/2, 1}); normal interval mean +- z s / sqrt(n) with the sample standard
  deviation s, clipped to the scores' range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def wilson_interval(k: int, n: int, z: float = Z95) -> Estimate:
    """Proportion k/n with its Wilson score interval; n = 0 gives nan with [0, 1]."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Estimate(math.nan, 0.0, 1.0, 0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(values: list[float], z: float = Z95, bounds: tuple[float, float] = (0.0, 1.0)) -> Estimate:
    """Mean of ``values`` with a normal interval, clipped to ``bounds``."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, bounds[0], bounds[1], 0)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, bounds[0], bounds[1], 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return Estimate(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), n)
