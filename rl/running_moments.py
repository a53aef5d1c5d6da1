"""Running mean / std of reward-model scores, for ``--normalize_reward``."""

from __future__ import annotations

import math

import torch


class RunningMoments:
    """Mean and (population) variance of every value seen so far, merged batch by batch with
    Chan et al.'s parallel update (1979): for a new batch with n_b, mu_b, var_b,

        delta = mu_b - mu;  n' = n + n_b;  mu' = mu + delta * n_b / n'
        M2'   = var * n + var_b * n_b + delta^2 * n * n_b / n';  var' = M2' / n'

    ``normalize(x) = (x - mu) / (sigma + eps)`` with the moments *including* x's batch (as
    OpenRLHF / TRL do), so the first batch is already centred. ``state_dict`` makes it resumable.
    """

    def __init__(self, eps: float = 1e-8):
        self.count, self.mean, self.var, self.eps = 0, 0.0, 1.0, eps

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n_b = x.numel()
        if n_b == 0:
            return
        mu_b, var_b = x.mean().item(), x.var(unbiased=False).item()
        if self.count == 0:
            self.count, self.mean, self.var = n_b, mu_b, var_b
            return
        n = self.count + n_b
        delta = mu_b - self.mean
        m2 = self.var * self.count + var_b * n_b + delta * delta * self.count * n_b / n
        self.mean += delta * n_b / n
        self.var, self.count = m2 / n, n

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (math.sqrt(self.var) + self.eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])
