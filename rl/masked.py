"""Masked reductions over right-padded ``(B, T)`` per-token tensors.

Every RL quantity lives on response tokens only; padding may hold anything (0, stale values, even
``inf`` from a log-prob of a padded token), so the helpers *select* with ``torch.where`` instead of
multiplying by the mask: ``inf * 0`` is NaN, ``where(mask, inf, 0)`` is 0. A mask is 0/1 (bool,
int or float); an all-zero mask gives 0, never NaN.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_t mask_t * x_t in fp32 (over everything when ``dim`` is None); padding is ignored, not multiplied."""
    selected = torch.where(mask.bool(), x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_t mask_t x_t / max(1, sum_t mask_t), in fp32.

    ``dim=None`` is the token-level mean over the whole batch (every real token weighs the same);
    ``dim=-1`` is a per-row mean. Rows (or batches) without a real token give 0.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).float()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) over the masked tokens of the whole batch; 0 at padding.

    mu = masked_mean(x), var = masked_mean((x - mu)^2): the population (biased) variance, as in
    OpenRLHF's advantage normalisation, so one real token or an all-padding batch gives 0, not an
    error or NaN (TRL's Bessel-corrected ``masked_var`` raises there). With ``shift_mean=False`` the
    mean is added back, (x - mu) / sigma + mu, as in TRL's ``whiten``: only the spread is
    normalised, so a baseline that already centred the advantages (ReMax, RLOO) is not undone by
    the batch mean. Statistics are over this call's tensors only; a data-parallel trainer that
    wants global statistics must whiten the gathered batch (the Ray driver holds it).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x.float() - mean) ** 2, mask)
    whitened = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))
