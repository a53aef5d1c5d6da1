"""The KL coefficient beta of the reward r_t = -beta * KL_t (+ RM score at the last token).

Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (2019, arXiv 1909.08593),
section 2.2: a fixed beta, or a proportional controller that steers the measured KL towards a
target. Both expose ``value`` (the beta to use now), ``update(current_kl, n_steps)`` (call once per
rollout batch) and ``state_dict()`` / ``load_state_dict()`` so a resumed run continues with the
beta it had, not the initial one.
"""

from __future__ import annotations


class FixedKLController:
    """beta_t = beta_0 for all t (Ziegler et al. 2019; the seed system's ``--init_kl_coef``)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed. Kept so the trainer calls both controllers the same way."""

    def state_dict(self) -> dict:
        """{"value": beta}."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore beta from ``state_dict()``."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2, in the
    form of their lm-human-preferences code, also OpenRLHF's and verl's):

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + e_t * n_steps / horizon)

    ``current_kl`` must be in the unit ``target`` is set in. Ziegler et al. measure the KL per
    episode (the sum over a response's tokens); verl and OpenRLHF pass the per-token mean of each
    response, averaged over the batch (a target about T times smaller). ``n_steps`` is the number
    of samples since the last update (verl passes the batch size), so ``horizon`` is measured in
    samples (10000 in the paper). The clip bounds the change of beta per update whatever the KL
    measurement does.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """{"value": beta, "target": ..., "horizon": ...}; target and horizon are recorded for inspection."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore beta. Target and horizon stay as configured, so a resumed run may change them."""
        self.value = float(state["value"])
