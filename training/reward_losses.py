"""Pairwise reward-model losses (``--loss sigmoid | logexp | logexpwithlm``).

Bradley-Terry (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1): P(chosen > rejected) =
sigma(r_c - r_r). With a per-pair margin m (preference strength, e.g. from the judge), the pair
must be separated by at least m: P = sigma(r_c - r_r - m) (Touvron et al. 2023, Llama 2, eq. 2).

``sigmoid`` (-log sigma(r_c - r_r - m)) and ``logexp`` (log(1 + exp(r_r - r_c + m))) are the same
function; the seed system had both names (and only ``logexpwithlm`` actually ran). Both are
computed as ``softplus(r_r - r_c + m)``, which is finite for any reward gap (the seed's literal
``log(1 + exp(.))`` overflows to inf for gaps above ~88 in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_logistic_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """mean_i softplus(r_r,i - r_c,i + m_i) = mean_i -log sigma(r_c,i - r_r,i - m_i)."""
    gap = chosen.float() - rejected.float()
    if margin is not None:
        gap = gap - margin.float()
    return F.softplus(-gap).mean()


def language_model_loss(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the tokens where ``mask`` is set (token-level mean).
    ``token_log_probs`` are log pi(x_t | x_<t) aligned with their tokens (``models.Actor``)."""
    mask = mask.to(token_log_probs.dtype)
    return -(token_log_probs * mask).sum() / mask.sum().clamp(min=1)


def logexp_with_lm_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    chosen_token_log_probs: torch.Tensor,
    chosen_response_mask: torch.Tensor,
    lm_loss_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logexp + ``lm_loss_coef`` x LM cross-entropy on the chosen **response** tokens.

    The LM term keeps the backbone a language model while it learns to rank (the seed system's
    ``LogExpWithLMLoss``, which also scored prompt tokens and one target across each packed sample
    boundary; here only response tokens count and no target crosses a boundary).
    Returns the total and its parts for logging.
    """
    rm = pairwise_logistic_loss(chosen, rejected, margin)
    lm = language_model_loss(chosen_token_log_probs, chosen_response_mask)
    return rm + lm_loss_coef * lm, {"rm_loss": rm.detach(), "lm_loss": lm.detach()}


def reward_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly (ties count as wrong)."""
    return (chosen > rejected).float().mean()


LOSS_NAMES = ("sigmoid", "logexp", "logexpwithlm")
