"""Confidence intervals for the judge's and the policies' figures (small samples: 50-200 pairs).

* ``wilson_interval(k, n)``: a binomial proportion (accuracy, agreement, share kept). Wilson's
  score interval (E. B. Wilson, JASA 1927) stays inside [0, 1] and keeps its coverage near
  k = 0 or k = n, where the normal approximation p +- z sqrt(p(1-p)/n) collapses to a point:

      centre = (p + z^2 / 2n) / (1 + z^2 / n)
      half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

* ``mean_interval(xs)``: the mean of bounded per-item scores (a win rate with ties counted as
  1/2: scores in {0, 1/2, 1}); normal interval mean +- z s / sqrt(n) with the sample standard
  deviation s, clipped to the scores' range.
* ``length_controlled_win_rate(scores, length_diffs)``: the win rate with the length effect taken
  out (AlpacaEval 2's length-controlled win rate: Dubois et al., "Length-Controlled AlpacaEval",
  2024). Per prompt i, with score s_i in {0, 1/2, 1} and d_i = len_A - len_B in tokens, fit

      P(A preferred | d) = sigmoid(theta + phi * tanh(d / sd(d)))

  by maximum likelihood (cross-entropy against s_i: a tie is half a win); the length-controlled
  win rate is sigmoid(theta), the prediction for two responses of equal length, and phi says how
  much length alone moves the verdict. Interval: percentile bootstrap over prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


def _fit_length_logit(scores: np.ndarray, x: np.ndarray, ridge: float = 1e-3) -> tuple[float, float]:
    """(theta, phi) maximising sum s log p + (1 - s) log(1 - p), p = sigmoid(theta + phi x), by
    Newton's method; a small ridge keeps it finite when one side wins every prompt."""
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (scores - p) - ridge * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(scores: list[float], length_diffs: list[float], n_boot: int = 1000, seed: int = 0,
                               level: float = 0.95) -> tuple[Estimate, float]:
    """``(sigmoid(theta) with a bootstrap interval, phi)`` for per-prompt scores and length
    differences A - B (module docstring)."""
    s, d = np.asarray(scores, dtype=float), np.asarray(length_diffs, dtype=float)
    n = len(s)
    if n == 0:
        return Estimate(math.nan, 0.0, 1.0, 0), math.nan

    def fit(idx: np.ndarray) -> tuple[float, float]:
        sd = d[idx].std()
        x = np.tanh(d[idx] / sd) if sd > 0 else np.zeros(len(idx))
        return _fit_length_logit(s[idx], x)

    theta, phi = fit(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = sorted(1.0 / (1.0 + math.exp(-fit(rng.integers(0, n, n))[0])) for _ in range(n_boot))
    tail = (1.0 - level) / 2
    low, high = boots[int(tail * (n_boot - 1))], boots[int(math.ceil((1 - tail) * (n_boot - 1)))]
    return Estimate(1.0 / (1.0 + math.exp(-theta)), low, high, n), phi
