"""Policy and value losses on ``(B, T)`` response tokens: PPO-clip, plain REINFORCE, clipped value.

Each returns ``(loss, stats)``: ``loss`` is an fp32 scalar with gradient, ``stats`` maps names to
detached fp32 scalars, each a token mean over this call's ``mask`` (for logging).

Aggregation is a TOKEN-LEVEL mean: sum over all real tokens of the batch / number of real tokens.
Every token weighs the same whatever its response's length (a per-sequence mean would let each
token of a short response count more than one of a long response; DAPO, Yu et al. 2025, arXiv
2503.14476, section 3.3); it is what ReMax's ``actor_loss_fn`` computes, and what the seed system's
per-row mean became under packing (one packed row). ``num_tokens`` replaces the denominator: pass
the token count of the whole mini-batch (over all micro-batches and ranks, divided by the world
size, since FSDP averages gradients over ranks) to make the accumulated gradient exactly that of
one global token mean (``training.step.train_step``'s contract).
"""

from __future__ import annotations

import torch

from rl.masked import masked_mean, masked_sum

# exp() of a log-ratio beyond +-20 is already far outside any clip range; clamping keeps
# ratio * A finite, so backward never meets inf * 0 = NaN (verl clamps at 20 too)
_MAX_LOG_RATIO = 20.0


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    """sum over masked tokens / (``num_tokens`` or the number of masked tokens, at least 1)."""
    if num_tokens is None:
        return masked_mean(per_token, mask)
    return masked_sum(per_token, mask) / max(float(num_tokens), 1e-8)


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), per token:

        rho_t = exp(logp_t - old_logp_t)
        L_t   = -min(rho_t * A_t, clip(rho_t, 1 - clip_eps, 1 + clip_eps_high) * A_t)

    token-level mean over the mask (module docstring). ``clip_eps_high`` (default ``clip_eps``)
    allows DAPO's asymmetric "clip-higher" range (Yu et al. 2025). Gradients flow to ``log_probs``
    only: ``old_log_probs`` (the rollout policy) and ``advantages`` are detached here so a caller
    cannot leak gradient into them by accident.

    stats: ``clip_fraction`` = share of real tokens where the clipped term's loss is strictly the
    larger, so the pessimistic min picks it and their gradient is 0 (verl's ``pg_clipfrac``); ``approx_kl`` = k3 estimate of
    KL(pi_old || pi) = mean((rho - 1) - log rho) (Schulman 2020; cleanrl's ``approx_kl``), useful
    for early stopping; ``ratio_mean`` / ``ratio_max`` over real tokens (0 when there are none).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=log_probs.device)
    # where(), not *mask: padded log-probs may be anything, and must not reach exp()
    log_ratio = torch.where(keep, log_probs.float() - old_log_probs.detach().float(), zero)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = torch.where(keep, advantages.detach().float(), zero)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)

    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(keep, ratio, zero).max(),  # ratio > 0, so padding's 0 never wins
        }
    return loss, stats


def reinforce_policy_loss(
    log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE (Williams 1992): L = mean_t -A_t * logp_t, token-level mean over the mask.

    The ReMax loss (Li et al. 2023; ``actor_loss_fn``: ``sum(-returns * logp * mask) / mask.sum()``),
    for data sampled by the current weights: one gradient step per rollout, no ratio, no clip.
    Its gradient equals PPO's at rho = 1, so ``ppo_policy_loss`` on fresh data is the same step.
    ``advantages`` are detached. stats: ``trained_advantage_mean`` over real tokens (after any
    whitening; the driver logs ``advantage_mean`` before it).
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=log_probs.device)
    adv = torch.where(keep, advantages.detach().float(), zero)
    loss = _token_mean(-adv * torch.where(keep, log_probs.float(), zero), mask, num_tokens)
    return loss, {"trained_advantage_mean": masked_mean(adv, mask)}


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO value loss with value clipping (OpenAI baselines ppo2; OpenRLHF ``ValueLoss``), per token:

        V_clip = V_old + clip(V - V_old, -clip_eps, clip_eps)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    token-level mean over the mask. The clip keeps the critic from moving far from the values the
    advantages were computed with, in the same trust-region spirit as the policy clip (Engstrom et
    al. 2020 found no benefit on MuJoCo; it is the seed system's and OpenRLHF's default).
    ``clip_eps=None`` gives the plain 0.5 (V - R)^2. ``old_values`` and ``returns`` are detached.
    stats: ``value_clip_fraction`` = share of tokens where the clipped error is the larger one
    (their gradient is 0).
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    # select before squaring: a padded value of inf would otherwise give a NaN gradient
    v = torch.where(keep, values.float(), zero)
    r = torch.where(keep, returns.detach().float(), zero)
    unclipped = (v - r) ** 2
    if clip_eps is None:
        return 0.5 * _token_mean(unclipped, mask, num_tokens), {"value_clip_fraction": zero.clone()}
    old = torch.where(keep, old_values.detach().float(), zero)
    v_clipped = old + (v - old).clamp(-clip_eps, clip_eps)
    clipped = (v_clipped - r) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats
