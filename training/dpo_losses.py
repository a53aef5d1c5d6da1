"""Direct preference losses on sequence log-probabilities (``train_dpo.py``).

For a pair (x, y_w, y_l), with ``pi`` the policy being trained and ``ref`` the frozen reference
(the initial policy), the implicit reward of a response is ``r(y) = beta * (log pi(y|x) - log ref(y|x))``
and the preference logit is

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

* ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv 2305.18290), with label smoothing eps (conservative
  DPO, Mitchell 2023: the label is wrong with probability eps):

      L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

* ``ipo`` (Azar et al. 2023, arXiv 2310.12036): a squared loss that does not push h to infinity,

      L = (h - 1 / (2 * beta))^2

  with log-probs averaged over each response's tokens, as TRL's ``DPOTrainer`` computes IPO.

* ``strength`` (this project): the sigmoid loss with a per-pair eps = 1 - strength, where strength
  in [0.5, 1] is the self-reference judge's own preference strength (``self_ref.label``'s
  ``strength`` field). A certain judgement (strength 1) is plain DPO; an undecided one (0.5) pulls
  h towards 0 instead of pushing the pair apart, so uncertain labels pull less.

Every function takes per-pair tensors of shape ``(n,)`` and returns per-pair losses: the caller
chooses the reduction (the trainers scale each micro-batch by its share of the global batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "strength")


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (pi_w - ref_w) - (pi_l - ref_l), per pair."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_dpo_loss(logits: torch.Tensor, beta: float, label_smoothing: float | torch.Tensor = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); ``label_smoothing`` eps is a
    float or one value per pair."""
    scaled = beta * logits
    return -(1.0 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """(h - 1 / (2 beta))^2, h from per-token mean log-probs."""
    return (logits - 1.0 / (2.0 * beta)) ** 2


def strength_label_smoothing(strength: torch.Tensor) -> torch.Tensor:
    """eps = 1 - strength for strengths in [0.5, 1] (the judge's probability that the chosen
    response is better)."""
    if strength.numel() and (strength.min() < 0.5 or strength.max() > 1.0):
        raise ValueError(f"strengths must lie in [0.5, 1], got [{strength.min():.3f}, {strength.max():.3f}]")
    return 1.0 - strength


def dpo_loss(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0, strength: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards ``beta * (pi - ref)`` of the chosen and rejected
    responses. The log-probs are what the loss type needs: sums over response tokens for
    ``sigmoid`` / ``strength``, per-token means for ``ipo`` (``needs_mean_logprobs``)."""
    logits = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type == "sigmoid":
        losses = sigmoid_dpo_loss(logits, beta, label_smoothing)
    elif loss_type == "strength":
        if strength is None:
            raise ValueError("the strength loss needs each pair's strength")
        losses = sigmoid_dpo_loss(logits, beta, strength_label_smoothing(strength.to(logits)))
    elif loss_type == "ipo":
        losses = ipo_loss(logits, beta)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def needs_mean_logprobs(loss_type: str) -> bool:
    """IPO compares per-token mean log-probs; the sigmoid losses compare sums."""
    return loss_type == "ipo"
